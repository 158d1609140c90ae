"""FASTA reader and `esmflash embed` command line, end to end on the real (small) model.

Every CLI run uses esm2_t6_8M_UR50D in fp32 on the CPU (seeded random weights unless a checkpoint
is on disk; the direct reference loads it the same way). Bad input must fail before the model is
loaded, with one `esmflash: error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esmflash.cli import main
from esmflash.embed import embed
from esmflash.errors import EmptySequenceError, FastaFormatError
from esmflash.fasta import read_fasta
from esmflash.models import load_esm2_model

MODEL = "esm2_t6_8M_UR50D"
DIM = 320
LAYERS = 6
BASE = ["--model", MODEL, "--precision", "fp32", "--device", "cpu", "--no-progress"]

GOOD_FASTA = """\
>seq1 first protein, split over two lines
MKTAYIAKQR
QISFVKSHFS
>lower a lowercase copy of seq1
mktayiakqr qisfvkshfs
>short
MV
>masked one <mask> residue
MKT<mask>YIAK
"""
GOOD_IDS = ["seq1", "lower", "short", "masked"]
GOOD_LENGTHS = [20, 20, 2, 8]
LONG_SEQ = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 40)[:1030]


# ----------------------------------------------------------------------------- helpers / fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fasta_cli")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """main(["embed", ...]) in-process -> (exit status, stderr)."""
    capsys.readouterr()  # drop anything captured before
    rc = main(["embed", *(str(a) for a in args)])
    return rc, capsys.readouterr().err


def assert_one_error_line(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("esmflash: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def model():
    model, _ = load_esm2_model(MODEL, precision="fp32", device="cpu", seed=0)
    return model


@pytest.fixture(scope="module")
def good_run(work):
    """One successful CLI run with --per-token on GOOD_FASTA, output name without .npz."""
    fasta = write(work, "good.fasta", GOOD_FASTA)
    out = work / "good.embeddings"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # capsys is function-scoped
        rc = main(["embed", str(fasta), "-o", str(out), *BASE, "--per-token", "--repr-layers", "0", "-1"])
    assert rc == 0, err.getvalue()
    return fasta, out, err.getvalue()


# ----------------------------------------------------------------------------- read_fasta


def test_read_fasta_multiline_description_blank_lines():
    text = ">a some description\nMKT\nAYI\n\n>b\n  MV K \n\n"
    assert read_fasta(io.StringIO(text)) == [("a", "MKTAYI"), ("b", "MVK")]


def test_read_fasta_path_types_crlf_and_bom(work):
    path = work / "crlf.fasta"
    path.write_bytes(b"\xef\xbb\xbf>a desc\r\nMKT\r\nAYI\r\n>b\r\nMV\r\n")
    expected = [("a", "MKTAYI"), ("b", "MV")]
    assert read_fasta(path) == expected
    assert read_fasta(str(path)) == expected
    # A stream that does not translate newlines still parses.
    assert read_fasta(io.StringIO(">a desc\r\nMKT\r\nAYI\r\n>b\r\nMV\r\n")) == expected


def test_read_fasta_leaves_validation_and_duplicates_to_packing():
    text = ">x\nACDJK\n>x\nmkt\n"
    assert read_fasta(io.StringIO(text)) == [("x", "ACDJK"), ("x", "mkt")]


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("MKT\n>a\nMKT\n", ["line 1", "before the first '>' header"]),
        ("\n\nhello\n>a\nMKT\n", ["line 3", "before the first '>' header"]),
        (">a\nMKT\n>\nMKV\n", ["line 3", "no id", "'a'"]),
        (">   \nMKV\n", ["line 1", "no id"]),
        ("", ["no FASTA records"]),
        ("\n  \n", ["no FASTA records"]),
    ],
)
def test_read_fasta_format_errors(text, fragments):
    with pytest.raises(FastaFormatError) as info:
        read_fasta(io.StringIO(text))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("text", [">a\nMKT\n>e desc\n\n>b\nMV\n", ">a\nMKT\n>e\n"])
def test_read_fasta_empty_sequence(text):
    with pytest.raises(EmptySequenceError) as info:
        read_fasta(io.StringIO(text))
    assert info.value.seq_id == "e"


# ----------------------------------------------------------------------------- good runs


def test_good_run_matches_direct_embed(good_run, model):
    fasta, out, err = good_run
    assert out.is_file() and not Path(str(out) + ".npz").exists()  # exact output name
    with np.load(out) as f:
        data = {k: f[k] for k in f.files}
    assert set(data) == {"ids", "mean_0", "mean_6", "tokens_0", "tokens_6", "offsets", "meta"}
    assert data["ids"].tolist() == GOOD_IDS
    for layer in (0, LAYERS):
        assert data[f"mean_{layer}"].shape == (len(GOOD_IDS), DIM)
        assert data[f"mean_{layer}"].dtype == np.float32
        assert data[f"tokens_{layer}"].shape == (sum(GOOD_LENGTHS), DIM)
        assert data[f"tokens_{layer}"].dtype == np.float32
    offsets = data["offsets"]
    assert offsets.dtype == np.int64
    assert offsets.tolist() == np.concatenate([[0], np.cumsum(GOOD_LENGTHS)]).tolist()

    ref = embed(model, read_fasta(fasta), max_tokens=16384, repr_layers=[0, LAYERS], per_token=True)
    assert ref.ids == GOOD_IDS
    for layer in (0, LAYERS):
        np.testing.assert_allclose(data[f"mean_{layer}"], ref.mean[layer].numpy(), rtol=1e-5, atol=1e-6)
        for i, rows in enumerate(ref.per_token[layer]):
            got = data[f"tokens_{layer}"][offsets[i] : offsets[i + 1]]
            np.testing.assert_allclose(got, rows.numpy(), rtol=1e-5, atol=1e-6)
            # The mean is the mean of that sequence's per-token rows.
            np.testing.assert_allclose(got.mean(0), data[f"mean_{layer}"][i], rtol=1e-4, atol=1e-5)
    # Lowercase input embeds exactly like uppercase.
    np.testing.assert_allclose(data["mean_6"][1], data["mean_6"][0], rtol=1e-5, atol=1e-6)

    meta = json.loads(str(data["meta"]))
    assert meta == {
        "model": MODEL,
        "weights_source": model.weights_source,
        "precision": "fp32",
        "attention_backend": "sdpa",
        "gemm_backend": "cublas",
        "norm_backend": "torch",
        "forward_impl": "eager",
        "cuda_graphs": False,
        "micro_batch_tokens": 16384,
        "esmflash_version": "0.1.0",
        "repr_layers": [0, LAYERS],
        "long_policy": "error",
    }
    assert "embedded 4 sequences" in err and "tokens/s" in err
    if model.weights_source.startswith("random-init"):
        assert "seeded random weights" in err  # the models.py warning reaches the user


def test_long_sequence_policies(capsys, work):
    fasta = write(work, "long.fasta", f">long\n{LONG_SEQ}\n>s\nMKV\n")
    rc, err = run_cli(capsys, fasta, "-o", work / "long.npz", *BASE)
    assert_one_error_line(rc, err, "'long'", "1030", "--long-policy")
    assert not (work / "long.npz").exists()

    for policy, rows in (("truncate", 1022), ("chunk", 1030)):
        out = work / f"long_{policy}.npz"
        rc, err = run_cli(capsys, fasta, "-o", out, *BASE, "--per-token", "--long-policy", policy)
        assert rc == 0, err
        with np.load(out) as f:
            assert f["ids"].tolist() == ["long", "s"]
            mean, tokens, offsets = f["mean_6"], f["tokens_6"], f["offsets"]
            assert mean.shape == (2, DIM) and np.isfinite(mean).all()
            assert offsets.tolist() == [0, rows, rows + 3]
            assert tokens.shape == (rows + 3, DIM) and np.isfinite(tokens).all()
            np.testing.assert_allclose(tokens[:rows].mean(0), mean[0], rtol=1e-4, atol=1e-5)
            assert json.loads(str(f["meta"]))["long_policy"] == policy


# ----------------------------------------------------------------------------- bad input -> exit 2


@pytest.mark.parametrize(
    "name, text, extra, fragments",
    [
        ("invalid", ">ok\nMKT\n>bad\nACDJK\n", [], ["'bad'", "'J'", "position 4"]),
        ("invalid_lower", ">bad\nacdjk\n", [], ["'bad'", "'j'", "position 4"]),
        ("empty_seq", ">good\nMKT\n>empty desc\n>x\nMK\n", [], ["'empty'", "empty sequence"]),
        ("duplicate", ">dup\nMKT\n>other\nMV\n>dup\nMKV\n", [], ["'dup'", "duplicate", "records 1 and 3"]),
        ("before_header", "MKT\n>a\nMKT\n", [], ["line 1", "before the first '>' header"]),
        ("no_id", ">a\nMKT\n>\nMKV\n", [], ["line 3", "no id"]),
        ("empty_file", "", [], ["no FASTA records"]),
        ("budget", ">a\n" + "M" * 30 + "\n", ["--max-tokens", "20"], ["'a'", "32 tokens", "max_tokens is 20"]),
        ("tiny_budget", ">a\nM\n", ["--max-tokens", "2"], ["max_tokens", "at least 3"]),
        ("unknown_backend", ">a\nMKT\n", ["--attention", "nope"], ["unknown attention backend 'nope'"]),
        ("flash_on_cpu", ">a\nMKT\n", ["--attention", "flash_attn"], ["'flash_attn' unavailable", "CUDA"]),
        ("fa4_on_cpu", ">a\nMKT\n", ["--attention", "fa4"], ["'fa4' unavailable", "CUDA"]),
        ("torch_flash_on_cpu", ">a\nMKT\n", ["--attention", "torch_flash"], ["'torch_flash' unavailable"]),
        ("quack_on_cpu", ">a\nMKT\n", ["--gemm", "quack"], ["GEMM backend 'quack' unavailable", "CUDA"]),
        ("unknown_gemm", ">a\nMKT\n", ["--gemm", "cutlass"], ["unknown GEMM backend 'cutlass'"]),
        ("triton_on_cpu", ">a\nMKT\n", ["--norm", "triton"], ["norm backend 'triton' unavailable", "CUDA"]),
        ("unknown_norm", ">a\nMKT\n", ["--norm", "apex"], ["unknown norm backend 'apex'"]),
        ("micro_batch_too_small", ">a\nMKT\n>long\n" + "M" * 40 + "\n", ["--micro-batch-tokens", "30"],
         ["'long'", "42 tokens", "--micro-batch-tokens is 30"]),
        ("micro_batch_negative", ">a\nMKT\n", ["--micro-batch-tokens", "-1"], ["--micro-batch-tokens must be >= 0"]),
        ("cuda_graphs_on_cpu", ">a\nMKT\n", ["--cuda-graphs"], ["--cuda-graphs needs a CUDA device"]),
        ("layer_too_big", ">a\nMKT\n", ["--repr-layers", "7"], ["--repr-layers 7", "out of range"]),
        ("layer_too_small", ">a\nMKT\n", ["--repr-layers", "-8"], ["--repr-layers -8", "out of range"]),
        ("bad_device", ">a\nMKT\n", ["--device", "nodevice"], ["--device", "nodevice"]),
    ],
)
def test_bad_input_exits_2(capsys, work, name, text, extra, fragments):
    fasta = write(work, f"{name}.fasta", text)
    out = work / f"{name}.npz"
    args = [fasta, "-o", out, *BASE, *extra]
    if "--device" in extra:
        args = [fasta, "-o", out, "--model", MODEL, "--no-progress", *extra]
    rc, err = run_cli(capsys, *args)
    assert_one_error_line(rc, err, *fragments)
    assert not out.exists()


def test_missing_input_and_output_dir(capsys, work):
    rc, err = run_cli(capsys, work / "no_such.fasta", "-o", work / "x.npz", *BASE)
    assert_one_error_line(rc, err, "No such file", "no_such.fasta")
    fasta = write(work, "ok.fasta", ">a\nMKT\n")
    rc, err = run_cli(capsys, fasta, "-o", work / "no_such_dir" / "x.npz", *BASE)
    assert_one_error_line(rc, err, "no_such_dir")
    rc, err = run_cli(capsys, fasta, "-o", work, *BASE)
    assert_one_error_line(rc, err, "is a directory")


def test_bad_model_exits_2(capsys, work):
    fasta = write(work, "ok.fasta", ">a\nMKT\n")
    rc, err = run_cli(capsys, fasta, "-o", work / "m.npz", *BASE[2:], "--model", work / "missing.pt")
    assert_one_error_line(rc, err, "missing.pt", "neither a released ESM-2 name")
    torch.save({"weights": torch.zeros(1)}, work / "not_esm.pt")
    rc, err = run_cli(capsys, fasta, "-o", work / "m.npz", *BASE[2:], "--model", work / "not_esm.pt")
    assert_one_error_line(rc, err, "not_esm.pt", "not a fair-esm checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(capsys, work):
    fasta = write(work, "ok.fasta", ">a\nMKT\n")
    rc, err = run_cli(capsys, fasta, "-o", work / "c.npz", "--model", MODEL, "--device", "cuda")
    assert_one_error_line(rc, err, "CUDA is not available")


def test_usage_errors_exit_2(capsys, work):
    with pytest.raises(SystemExit) as info:
        main(["embed", str(work / "ok.fasta")])  # no -o
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["embed", str(work / "ok.fasta"), "-o", "x.npz", "--precision", "fp8"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# ----------------------------------------------------------------------------- atomic output


def test_failed_run_leaves_existing_output_untouched(capsys, work, good_run):
    directory = work / "atomic"
    directory.mkdir()
    out = directory / "out.npz"
    out.write_bytes(good_run[1].read_bytes())
    before = out.read_bytes()
    listing = sorted(os.listdir(directory))
    bad = write(work, "atomic_bad.fasta", ">bad\nACDJK\n")
    ok = write(work, "atomic_ok.fasta", ">a\nMKT\n")
    torch.save({"weights": torch.zeros(1)}, work / "atomic_not_esm.pt")
    failing = [
        [bad, "-o", out, *BASE],  # fails while validating input
        [ok, "-o", out, *BASE, "--attention", "fa4"],  # fails on configuration
        # These fail while loading the model, after the temporary file was created.
        [ok, "-o", out, *BASE[2:], "--model", work / "atomic_missing.pt"],
        [ok, "-o", out, *BASE[2:], "--model", work / "atomic_not_esm.pt"],
    ]
    for args in failing:
        rc, err = run_cli(capsys, *args)
        assert_one_error_line(rc, err)
        assert out.read_bytes() == before
        assert sorted(os.listdir(directory)) == listing  # no temporary file left behind

    # A successful run replaces the file, still without leftovers.
    rc, err = run_cli(capsys, ok, "-o", out, *BASE)
    assert rc == 0, err
    assert sorted(os.listdir(directory)) == listing
    with np.load(out) as f:
        assert f["ids"].tolist() == ["a"] and f["mean_6"].shape == (1, DIM)


# ----------------------------------------------------------------------------- real processes


def test_subprocess_error_is_one_line_exit_2(work):
    fasta = write(work, "sub_bad.fasta", ">ok\nMKT\n>bad\nACDJK\n")
    proc = subprocess.run(
        [sys.executable, "-m", "esmflash", "embed", str(fasta), "-o", str(work / "sub_bad.npz"), *BASE],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("esmflash: error: sequence 'bad': invalid character 'J' at position 4")


def test_subprocess_stdin(work, model):
    text = ">p1\nMKTAYIAKQR\n>p2 desc\nMVLSPADKTN\nVKAAW\n"
    out = work / "stdin.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "esmflash", "embed", "-", "-o", str(out), *BASE],
        input=text, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "embedded 2 sequences" in proc.stderr
    ref = embed(model, read_fasta(io.StringIO(text)))
    with np.load(out) as f:
        assert set(f.files) == {"ids", "mean_6", "meta"}  # default: last layer, no per-token
        assert f["ids"].tolist() == ["p1", "p2"]
        np.testing.assert_allclose(f["mean_6"], ref.mean[LAYERS].numpy(), rtol=1e-5, atol=1e-6)


def test_compile_flag_gives_the_eager_embeddings(work, good_run):
    """--compile runs the torch.compile'd layers (recorded in meta) and matches the eager run."""
    fasta, out, _ = good_run
    compiled = work / "good-compiled.npz"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["embed", str(fasta), "-o", str(compiled), *BASE, "--per-token", "--repr-layers", "0", "-1",
                   "--compile"])
    assert rc == 0, err.getvalue()
    with np.load(out) as eager, np.load(compiled) as comp:
        assert comp["ids"].tolist() == eager["ids"].tolist()
        for key in ("mean_0", f"mean_{LAYERS}", f"tokens_{LAYERS}"):
            np.testing.assert_allclose(comp[key], eager[key], rtol=1e-5, atol=1e-5)
        assert json.loads(str(comp["meta"]))["forward_impl"] == "compiled"
