"""Recipe stages of this package (registered with slimkit.stages.register_stage)."""
