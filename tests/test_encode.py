"""Huffman coding, sparse layouts and the .slim container: exact round trips and clear errors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.encode import decode, huffman, load, save
from slimkit.encode.sparse import FORMATS, build_layout, choose_layout, decode_layout, gap_decode, gap_encode
from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.prune.magnitude import magnitude_prune_
from slimkit.quantize.sharing import share_weights_

RNG = np.random.default_rng(0)
STREAMS = {
    "uniform": RNG.integers(0, 256, 5000),
    "skewed": RNG.geometric(0.2, 5000) - 1,
    "one_symbol": np.full(100, 7),
    "all_distinct": RNG.permutation(300),
    "two_symbols": np.array([0, 1] * 50),
    "empty": np.zeros(0, dtype=np.int64),
    "single": np.array([3]),
    "fibonacci": np.repeat(np.arange(20), [int(((1 + 5**0.5) / 2) ** i) for i in range(20)]),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_huffman_round_trip_and_entropy_bound(name):
    x = STREAMS[name]
    alphabet = int(x.max(initial=0)) + 1
    lengths = huffman.code_lengths(np.bincount(x, minlength=alphabet))
    data = huffman.encode(x, lengths)
    np.testing.assert_array_equal(huffman.decode(data, lengths, x.size), x)
    if x.size:
        p = np.bincount(x) / x.size
        p = p[p > 0]
        entropy = float(-(p * np.log2(p)).sum())
        mean = huffman.encoded_bits(x, lengths) / x.size
        assert entropy - 1e-9 <= mean <= entropy + 1 + 1e-9  # H + 1 reached only by a lone symbol (1 bit)
        assert len(data) == (huffman.encoded_bits(x, lengths) + 7) // 8


def test_huffman_is_canonical_and_prefix_free():
    lengths = huffman.code_lengths(np.array([5, 9, 12, 13, 16, 45]))
    codes = huffman.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in range(6)]
    assert all(not b.startswith(a) for a in words for b in words if a != b)
    assert sum(2.0 ** -int(n) for n in lengths) == 1.0  # a complete code


def test_huffman_rejects_truncated_and_unknown_symbols():
    x = STREAMS["skewed"]
    lengths = huffman.code_lengths(np.bincount(x))
    data = huffman.encode(x, lengths)
    with pytest.raises(CorruptFileError):
        huffman.decode(data[: len(data) // 2], lengths, x.size)
    with pytest.raises(ValueError):
        huffman.encode(np.array([0, 1]), np.array([1, 0], dtype=np.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_gap_indices_with_fillers_round_trip(bits):
    positions = np.sort(RNG.choice(10000, 300, replace=False))
    gaps, is_filler = gap_encode(positions, bits)
    assert gaps.max() < 2**bits
    decoded = gap_decode(gaps)
    np.testing.assert_array_equal(decoded[~is_filler], positions)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_every_layout_round_trips(fmt, density):
    shape = (20, 6, 3, 3)
    symbols = np.where(RNG.random(shape) < density, RNG.integers(1, 17, shape), 0).ravel()
    for bits in ([0] if fmt in ("dense", "bitmask") else [1, 4]):
        layout = build_layout(symbols, shape, 17, fmt, bits)
        np.testing.assert_array_equal(decode_layout(layout, shape), symbols)


def test_smallest_layout_is_chosen():
    shape = (100, 400)
    sparse = np.where(RNG.random(shape) < 0.04, RNG.integers(1, 33, shape), 0).ravel()
    dense = RNG.integers(1, 33, shape).ravel()
    assert choose_layout(sparse, shape, 33).format in ("csr", "csc")
    assert choose_layout(dense, shape, 33).format == "dense"
    chosen = choose_layout(sparse, shape, 33)
    for fmt in FORMATS:
        assert chosen.nbytes() <= choose_layout(sparse, shape, 33, (fmt,)).nbytes()


def compressed(name: str) -> nn.Module:
    from slimkit.models import create_model

    model = create_model(name, num_classes=10, in_channels=1)
    magnitude_prune_(model, torch.zeros(1, 1, 28, 28), {"sparsity": 0.9})
    share_weights_(model, torch.zeros(1, 1, 28, 28), {"conv_bits": 8, "linear_bits": 5})
    return model.eval()


def custom() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    model[1].running_mean.uniform_()
    magnitude_prune_(model, torch.zeros(1, 1, 28, 28), {"sparsity": 0.8, "layers": ("4",)})
    share_weights_(model, torch.zeros(1, 1, 28, 28), {"linear_bits": 4, "layers": ("4",)})
    return model.eval()


@pytest.mark.parametrize("name", ["lenet5", "lenet-300-100"])
def test_zoo_container_round_trip_is_exact(tmp_path, name):
    model = compressed(name)
    infos = save(model, tmp_path / "m.slim")
    loaded = load(tmp_path / "m.slim")
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert sum(i.bytes for i in infos) < (tmp_path / "m.slim").stat().st_size  # + header and meta
    assert (tmp_path / "m.slim").stat().st_size * 20 < 4 * sum(p.numel() for p in model.parameters())


def test_custom_model_needs_skeleton_and_round_trips(tmp_path):
    model = custom()
    save(model, tmp_path / "c.slim")
    with pytest.raises(ConfigError, match="not from the zoo"):
        load(tmp_path / "c.slim")
    skeleton = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 26 * 26, 10))
    loaded = load(tmp_path / "c.slim", model=skeleton)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(loaded[4].weight_index, model[4].weight_index)


def test_decode_writes_a_manifest_model(tmp_path):
    from slimkit.manifest import load_model

    model = compressed("lenet5")
    save(model, tmp_path / "m.slim")
    decode(tmp_path / "m.slim", tmp_path / "model.pt")
    restored = load_model(tmp_path / "model.pt")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), restored(x))


def record_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, length incl. framing) of every record."""
    import struct

    pos, out = 14, []
    while pos < len(data):
        (n,) = struct.unpack("<I", data[pos : pos + 4])
        out.append((pos, n + 8))
        pos += n + 8
    return out


def test_corrupted_and_truncated_files_name_the_record(tmp_path):
    model = compressed("lenet5")
    path = tmp_path / "m.slim"
    save(model, path)
    data = path.read_bytes()
    records = record_offsets(data)
    bad = tmp_path / "bad.slim"
    # A flipped bit inside fc1.weight's payload (record 5: meta, conv1 w/b, conv2 w/b, fc1 w).
    start, length = records[5]
    flipped = bytearray(data)
    flipped[start + length // 2] ^= 0x10
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match=r"record 5 \('fc1.weight'\) is corrupted"):
        load(bad)
    bad.write_bytes(data[: start + length // 2])
    with pytest.raises(CorruptFileError, match=r"record 5 \('fc1.weight'\) is truncated"):
        load(bad)
    bad.write_bytes(data[: records[3][0]])
    with pytest.raises(CorruptFileError, match="truncated at record 3"):
        load(bad)
    bad.write_bytes(data[:10])
    with pytest.raises(CorruptFileError, match="truncated header"):
        load(bad)
    bad.write_bytes(b"PK" + data[2:])
    with pytest.raises(CorruptFileError, match="not a .slim file"):
        load(bad)
    bad.write_bytes(data + b"\x00")
    with pytest.raises(CorruptFileError, match="unexpected bytes"):
        load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.slim")


def test_encode_stage_reports_real_bytes(tmp_path):
    import copy

    from slimkit.stages import STAGES, StageContext, no_evaluation, no_training

    model = compressed("lenet5")
    baseline = copy.deepcopy(model)
    ctx = StageContext(example_inputs=torch.zeros(1, 1, 28, 28), data=None, train_config=None, run_dir=tmp_path,
                       baseline=baseline, finetune=no_training, evaluate=no_evaluation)
    spec = STAGES.get("encode")
    out = spec.apply(model, spec.config_cls.coerce({}), ctx)
    size = (tmp_path / "model.slim").stat().st_size
    assert out.stored_bytes == size and out.details["file_bytes"] == size
    assert out.details["ratio"] == pytest.approx(4 * 431080 / size, rel=1e-3)
    rows = {r["tensor"]: r for r in out.details["layers"]}
    assert rows["fc1.weight"]["nonzeros"] == 40000 and rows["fc1.weight"]["format"] in FORMATS
    assert rows["fc1.bias"]["format"] == "raw" and out.details["verified"]
    assert sum(r["bytes"] for r in rows.values()) < size


# --------------------------------------------------------------------------- the record codec table

REFERENCE = Path(__file__).parent / "data" / "slim_v2"


def _reference_skeleton() -> nn.Module:
    """The model every file in tests/data/slim_v2 stores (make_files.py there wrote them)."""
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 3))


def _digest(t: torch.Tensor) -> list:
    t = t.detach().cpu().contiguous()
    return [str(t.dtype), list(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()]


@pytest.mark.parametrize("name", ["shared_dct", "int4_per_channel", "int8_per_tensor", "binary"])
def test_files_written_before_the_codec_table_decode_and_reencode_identically(name):
    """Every record kind (RAW with/without mask, SHARED, DCT, PACKED uniform and binary) as commit 6bb6d82 wrote it."""
    from slimkit.encode.container import encode_model

    want = json.loads((REFERENCE / "tensors.json").read_text())[name]
    path = REFERENCE / f"{name}.slim"
    decoded = load(path, model=_reference_skeleton())
    assert {k: _digest(v) for k, v in decoded.state_dict().items()} == want["tensors"]
    data, infos = encode_model(decoded)
    assert hashlib.sha256(data).hexdigest() == want["reencoded_sha256"]
    if name != "binary":  # binary alpha is re-derived from the decoded weights (float rounding of a mean)
        assert data == path.read_bytes()
    kinds = {i.kind for i in infos}
    assert kinds == {"shared_dct": {"raw", "shared", "dct"}, "binary": {"raw", "packed"}}.get(name, {"raw", "packed"})


def test_the_built_in_record_kinds_come_from_their_owners_codecs():
    from slimkit.slim_codecs import RECORD_CODECS, codec_of_kind, record_codecs

    built_in = [c for c in record_codecs() if c.encode.__module__.startswith("slimkit.")]  # tests may add theirs
    assert [(c.name, c.kind) for c in built_in] == [("packed", 3), ("dct", 4), ("shared", 2)]  # by precedence
    assert {"dct", "packed", "shared"} <= set(RECORD_CODECS.names())
    assert codec_of_kind(3).decode.__module__ == "slimkit.quantize.packed_record"
    assert codec_of_kind(2).encode.__module__ == "slimkit.encode.shared_record"
    assert codec_of_kind(4).encode.__module__ == "slimkit.encode.dct_record"
    assert codec_of_kind(1) is None and codec_of_kind(200) is None


class HalfLinear(nn.Linear):
    """A Linear layer whose weight a test codec stores as float16 (values chosen exactly representable)."""


def _half_encode(module, formats):
    from slimkit.slim_codecs import RecordFigures, Writer

    w = Writer()
    w.u8(module.weight.dim())
    for d in module.weight.shape:
        w.u32(d)
    w.raw(module.weight.detach().numpy().astype("<f2").tobytes())
    return w.getvalue(), RecordFigures("fp16", int((module.weight != 0).sum()), 16.0)


def _half_decode(payload, what, prefix):
    from slimkit.slim_codecs import Reader

    r = Reader(payload, what)
    shape = tuple(r.u32() for _ in range(r.u8()))
    values = np.frombuffer(r.take(2 * int(np.prod(shape))), dtype="<f2").astype(np.float32).reshape(shape)
    return {prefix + "weight": torch.from_numpy(values)}


def _half_codec():
    from slimkit.slim_codecs import RECORD_CODECS, RecordCodec, register_record_codec

    if "half" not in RECORD_CODECS:
        register_record_codec(RecordCodec(name="half", kind=200, precedence=5, claims=lambda m: isinstance(
            m, HalfLinear), derived=lambda m: (), encode=_half_encode, decode=_half_decode))
    return RECORD_CODECS.get("half")


def test_a_codec_registered_elsewhere_stores_its_layers_and_only_them(tmp_path):
    _half_codec()

    def net():
        return nn.Sequential(HalfLinear(6, 4), nn.ReLU(), nn.Linear(4, 2))

    model = net()
    with torch.no_grad():  # float16-exact weights: the codec must give them back bit for bit
        model[0].weight.copy_(torch.randint(-64, 64, (4, 6)) / 64)
    infos = {i.name: i for i in save(model, tmp_path / "h.slim")}
    assert (infos["0.weight"].kind, infos["0.weight"].format) == ("half", "fp16")
    assert infos["2.weight"].kind == "raw" and infos["0.bias"].kind == "raw"
    assert infos["0.weight"].bytes == 4 + 3 + len("0.weight") + 1 + 2 * 4 + 2 * 24 + 4  # framing, dims, fp16 values
    loaded = load(tmp_path / "h.slim", model=net())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_codec_with_a_kind_taken_or_reserved_is_refused():
    from slimkit.slim_codecs import RecordCodec, register_record_codec

    half = _half_codec()
    for kind, needle in [(3, "kind 3 is taken by 'packed'"), (1, "outside 2..255"), (256, "outside 2..255")]:
        with pytest.raises(ConfigError, match=needle):
            register_record_codec(RecordCodec("other", kind, 50, half.claims, half.derived, half.encode, half.decode))


def test_a_record_of_an_unknown_kind_is_named(tmp_path):
    import struct
    import zlib

    model = nn.Sequential(nn.Linear(3, 2))
    save(model, tmp_path / "m.slim")
    data = (tmp_path / "m.slim").read_bytes()
    body = struct.pack("<BH", 250, 3) + b"odd" + b"\x00"
    record = struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))
    head = data[:4] + struct.pack("<HI", 2, struct.unpack("<I", data[6:10])[0] + 1)
    (tmp_path / "odd.slim").write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[14:] + record)
    with pytest.raises(CorruptFileError, match=r"record 3 \('odd'\): unknown record kind 250"):
        load(tmp_path / "odd.slim", model=nn.Sequential(nn.Linear(3, 2)))
