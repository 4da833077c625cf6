"""report.html from the test-only stages, on a local root and on the moto S3 root; the CLI writes
it after `run` (also after a failed stage) and on `report`."""

from __future__ import annotations

import re

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.report import fmt, relative, write_report
from pipeline.storage import Storage, join
from tests.stages_for_tests import make_pipeline


def test_report_sections_and_relative_links(ray_session, any_root):
    root, endpoint = any_root
    pipe = make_pipeline()
    base = ["run=rep", f"storage.root={root}", "tracking.mode=disabled"]
    if endpoint:
        base.append(f"storage.endpoint_url={endpoint}")
    cfg = load_config(None, base, pipe.schema)
    storage = Storage(endpoint_url=endpoint)
    pipe.run(cfg, storage, until="beta")
    uri = write_report(pipe, cfg, storage)
    assert uri == join(pipe.run_uri(cfg), "report.html")
    page = storage.read_text(uri)
    for name in ("alpha", "beta", "gamma"):
        assert f"<h2>{name}</h2>" in page
    assert "<th>total</th><td class='num'>20</td>" in page  # beta's scalar output
    assert "pending: not finished yet" in page  # gamma did not run
    links = re.findall(r"href='([^']+)'", page)
    assert links and all(not link.startswith(("/", "s3:")) for link in links), links
    assert any(link.startswith("alpha-") for link in links)


def test_cli_writes_report_even_when_a_stage_fails(ray_session, tmp_path):
    root = tmp_path / "runs"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 0\n")
    argv = ["run", str(cfg_file), f"storage.root={root}", "run=f", "tracking.mode=disabled",
            "alpha.fail_after=1"]
    assert main(argv, make_pipeline) == 1
    page = (root / "f" / "report.html").read_text()
    assert "<td>partial</td>" in page and "<td>pending</td>" in page
    (root / "f" / "report.html").unlink()
    assert main(["report", str(cfg_file), f"storage.root={root}", "run=f"], make_pipeline) == 0
    assert (root / "f" / "report.html").exists()


def test_helpers():
    assert relative("s3://b/runs/x/alpha-1/p.png", "s3://b/runs/x") == "alpha-1/p.png"
    assert relative("/elsewhere/p.png", "/runs/x") == "/elsewhere/p.png"
    assert fmt(0.123456) == "0.1235" and fmt(1234567) == "1,234,567" and fmt(True) == "True"
