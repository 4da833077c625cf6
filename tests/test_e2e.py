"""The embedded default end to end: configs/tiny.yaml through the real CLI, made smaller.

All five stages run on builtin:digits with the session's local Ray and W&B offline. Checked:
report.html exists and every image and folder it links exists; the sample stage's PNGs, grid,
high-resolution sample and classifier figures; `python -m pipeline sample RUN_URI` in a fresh
process writes N PNGs of the asked size plus grid.png, and rejects bad arguments with exit 2.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from tests.conftest import REPO

SMALL = [
    "train_vqgan.steps=30", "train_vqgan.checkpoint_every=30", "train_vqgan.image_every=30",
    "train_vqgan.eval_images=32", "train_vqgan.loss.disc_start=20",
    "tokenize.actors=1",
    "train_transformer.steps=30", "train_transformer.n_layer=2", "train_transformer.n_head=2",
    "train_transformer.n_embd=64", "train_transformer.micro_batch=16",
    "train_transformer.checkpoint_every=30", "train_transformer.image_every=30",
    "train_transformer.eval_samples=128", "train_transformer.samples_per_class=1",
    "sample.n=2", "sample.highres=[10,12]", "sample.highres_n=1",
    "sample.classifier_images=600", "sample.progress=false",
]


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "runs"
    argv = ["run", str(REPO / "configs" / "tiny.yaml"), "run=e2e", f"storage.root={root}",
            "tracking.mode=offline", *SMALL]
    assert main(argv) == 0
    return root / "e2e"


def _manifest(run_dir: Path, stage: str) -> dict:
    [folder] = run_dir.glob(f"{stage}-*")
    return json.loads((folder / "_manifest.json").read_text())


def test_report_links_exist(tiny_run):
    page = (tiny_run / "report.html").read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", page)
    images = [link for link in links if link.endswith(".png")]
    assert len(images) >= 4, links  # recon grid, GPT samples, sample grid, high-res sample
    for link in links:
        assert (tiny_run / link).exists(), f"report.html links a missing file: {link}"
    for stage in ("shard", "train_vqgan", "tokenize", "train_transformer", "sample"):
        assert f"<h2>{stage}</h2>" in page
    assert "classifier accuracy on samples" in page and "Stage timings" in page
    assert any("samples/grid.png" in i for i in images)
    assert any("highres/highres.png" in i for i in images)
    assert any("/images/recon-" in i for i in images)


def test_sample_stage_outputs(tiny_run):
    out = _manifest(tiny_run, "sample")["outputs"]
    assert out["classes"] == [str(k) for k in range(10)] and out["n"] == 20
    folder = Path(out["samples_dir"])
    pngs = sorted(p.name for p in folder.glob("class-*.png"))
    assert len(pngs) == 20 and pngs[0] == "class-000-0-000.png"
    assert Image.open(folder / pngs[0]).size == (16, 16)
    index = json.loads((folder.parent / "samples.json").read_text())
    assert [f["class"] for f in index["files"]] == [k for k in range(10) for _ in range(2)]
    hr = out["highres"]
    assert hr["code_grid"] == [10, 12] and hr["image_size"] == [20, 24]
    assert Image.open(hr["files"][0]).size == (24, 20)
    clf = out["classifier"]
    assert 0.0 <= clf["accuracy"] <= 1.0 and len(clf["per_class"]) == 10
    assert clf["real_val"]["accuracy"] > 0.8  # the yardstick itself works on real digits
    # W&B offline: the sample stage's run holds the images it logged.
    wandb_files = [p.name for p in (tiny_run / "wandb").rglob("*.png")]
    assert any(name.startswith("samples") for name in wandb_files), wandb_files


def test_manifests_are_typed_records(tiny_run):
    """Every stage declares its outputs record, and the record reproduces its manifest exactly
    (what producers wrote is what consumers read)."""
    from pipeline.cli import default_pipeline

    for stage in default_pipeline().stages.values():
        assert stage.outputs is not None, stage.name
        if stage.name in ("train_cond_vqgan", "train_baseline_transformer"):
            assert not list(tiny_run.glob(f"{stage.name}-*"))  # no conditions: skipped
            continue  # their records: tests/test_conditional_transformer.py
        manifest = _manifest(tiny_run, stage.name)
        record = stage.parse_outputs(manifest)
        assert isinstance(record, stage.outputs)
        assert record.to_dict() == manifest["outputs"], stage.name
    gpt = _manifest(tiny_run, "train_transformer")["outputs"]
    assert gpt["vqgan"] == _manifest(tiny_run, "train_vqgan")["outputs"]["export"]


def test_models_of_a_manifest_written_before_the_vqgan_was_recorded(tiny_run, tmp_path):
    """An older train_transformer manifest has no ``vqgan``: the models are still found, through
    the DAG's folder rule and the upstream fingerprint."""
    import shutil

    from pipeline.generate import find_models
    from pipeline.storage import Storage

    copy = tmp_path / "old"
    for folder in [*tiny_run.glob("train_transformer-*"), *tiny_run.glob("train_vqgan-*")]:
        shutil.copytree(folder / "export", copy / folder.name / "export")
        shutil.copy(folder / "_manifest.json", copy / folder.name / "_manifest.json")
    [gpt_dir] = copy.glob("train_transformer-*")
    manifest = json.loads((gpt_dir / "_manifest.json").read_text())
    expected = find_models(Storage(), str(gpt_dir))
    del manifest["outputs"]["vqgan"]
    (gpt_dir / "_manifest.json").write_text(json.dumps(manifest))
    models = find_models(Storage(), str(copy))
    assert models == expected and models.vqgan_weights.startswith(str(copy))
    shutil.rmtree(next(copy.glob("train_vqgan-*")))
    with pytest.raises(FileNotFoundError, match="the VQGAN this GPT was trained on"):
        find_models(Storage(), str(copy))


def _sample_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "sample", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_sample_command(tiny_run, tmp_path):
    out = tmp_path / "out"
    res = _sample_cli(str(tiny_run), "--class", "3", "--class", "7", "--n", "3",
                      "--size", "20x32", "--temperature", "0.9", "--top-k", "50", "--top-p",
                      "0.95", "--cfg", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in out.glob("class-*.png"))
    assert files == [f"class-{k:03d}-{k}-{i:03d}.png" for k in (3, 7) for i in range(3)]
    assert all(Image.open(out / f).size == (32, 20) for f in files)
    assert (out / "grid.png").exists()
    meta = json.loads((out / "samples.json").read_text())
    assert meta["code_grid"] == [10, 16] and meta["options"]["cfg_scale"] == 2.0

    # Same seed, same images; the stage folder works as RUN_URI too.
    again = tmp_path / "again"
    [gpt_dir] = tiny_run.glob("train_transformer-*")
    res = _sample_cli(str(gpt_dir), "--class", "3", "--class", "7", "--n", "3", "--size",
                      "20x32", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95",
                      "--cfg", "2", "--out", str(again))
    assert res.returncode == 0, res.stderr
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes()


def test_sample_command_on_a_run_copied_to_s3(tiny_run, s3_endpoint, s3_bucket):
    """A run folder synced to object storage: manifests still name the local paths they were
    written at; the command finds the models in the copy and writes its PNGs to the bucket."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    dest = f"{s3_bucket[len('s3://'):]}/synced/e2e"
    for folder in [*tiny_run.glob("train_transformer-*"), *tiny_run.glob("train_vqgan-*")]:
        for f in folder.rglob("*"):
            if f.is_file() and "train" not in f.relative_to(folder).parts[:1]:  # no checkpoints
                fs.put_file(str(f), f"{dest}/{folder.name}/{f.relative_to(folder)}")
    fs.put_file(str(tiny_run / "run.json"), f"{dest}/run.json")
    res = _sample_cli(f"{s3_bucket}/synced/e2e", "--n", "1", "--endpoint-url", s3_endpoint,
                      "--out", f"{s3_bucket}/out")
    assert res.returncode == 0, res.stderr
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket[len('s3://'):]}/out"))
    assert names == sorted([f"class-{k:03d}-{k}-000.png" for k in range(10)]
                           + ["grid.png", "samples.json"])


@pytest.mark.parametrize("args, message", [
    (["--size", "15x16"], "multiple of the VQGAN's downsampling factor 2"),
    (["--size", "8x8"], "smaller than the trained size 16x16"),
    (["--class", "12"], "--class: [12] not in [0, 10)"),
    (["--top-p", "0"], "top_p"),
    (["--size", "big"], "expected HxW"),
])
def test_sample_command_rejects_bad_arguments(tiny_run, tmp_path, capsys, args, message):
    code, err = _sample_in_process(capsys, str(tiny_run), *args, "--out", str(tmp_path / "x"))
    assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()


def test_sample_command_names_a_missing_run(tmp_path, capsys):
    code, err = _sample_in_process(capsys, str(tmp_path / "nothing"), "--out",
                                   str(tmp_path / "x"))
    assert code == 2 and "no finished train_transformer" in err, err


def _sample_in_process(capsys, *args: str) -> tuple[int, str]:
    """``pipeline sample`` through the CLI's main in this process (the refusals happen before
    any model loads; a subprocess per case only added interpreter start-ups): exit code and
    stderr."""
    try:
        code = main(["sample", *args])
    except SystemExit as e:  # argparse's own refusals
        code = int(e.code)
    return code, capsys.readouterr().err
