"""``lightning-ckpt list`` on the checkpoints of a real run: what a user and a script read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clirun import run
from lightning_ckpt.format import MODEL_FILE

STEPS = [4, 8, 12, 16, 20, 24]


def test_list_json_shows_every_checkpoint_with_its_facts(trained):
    result = run("list", trained.ckpts, "--json", "--monitor", "val_loss")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == STEPS
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]  # 8 batches an epoch
    assert all(r["status"] == "ok" and r["tiers"] == ["local"] and r["size"] > 0 and r["created"] > 0 for r in rows)
    assert [r["name"] for r in rows if r["last"]] == ["step=000000024"]
    # Validations ran at steps 6, 14 and 22, never at a save: each save recorded the last validation's
    # val_loss with the step it was computed at, a score of another state, so no checkpoint is "best".
    assert {r["step"]: r["metric_steps"]["val_loss"] for r in rows if "val_loss" in r["metrics"]} == {
        8: 6, 12: 6, 16: 14, 20: 14, 24: 22}
    assert not any(r["best"] for r in rows)
    assert all(r["metric_steps"]["train_loss"] == r["step"] for r in rows)
    assert len({r["run_id"] for r in rows}) == 1


def test_list_says_which_rule_keeps_each_checkpoint(trained):
    rows = json.loads(run("list", trained.ckpts, "--json", "--keep-last", "2").stdout)
    assert {r["step"]: r["kept_by"] for r in rows} == {
        4: [], 8: [], 12: [], 16: [], 20: ["last 2"], 24: ["newest", "last 2"]}


def test_list_piped_is_plain_text_with_a_header(trained):
    result = run("list", trained.ckpts)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["name", "step", "epoch", "time", "size", "status"]
    assert [line.split()[0] for line in lines[1:]] == [f"step={s:09d}" for s in STEPS]
    assert "\x1b[" not in result.stdout  # no terminal colour codes in a pipe


def test_list_marks_a_damaged_checkpoint(trained, tmp_path):
    copy = tmp_path / "c"
    subprocess.run(["cp", "-r", str(trained.ckpts), str(copy)], check=True)
    os.truncate(copy / "step=000000012" / MODEL_FILE, 10)
    rows = {r["step"]: r for r in json.loads(run("list", copy, "--json").stdout)}
    assert rows[12]["status"] == "damaged" and MODEL_FILE in rows[12]["problem"]
    assert "IncompleteCheckpointError" in rows[12]["problem"]
    assert all(rows[s]["status"] == "ok" for s in STEPS if s != 12)


def test_list_imports_neither_torch_nor_lightning(trained):
    code = ("import sys; from lightning_ckpt.cli import main\n"
            "try:\n    main(['list', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'numpy', 'rich') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(trained.ckpts)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_list_in_a_terminal_is_a_rich_table(trained):
    import pty

    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "250", "TERM": "xterm"}
    proc = subprocess.run([sys.executable, "-m", "lightning_ckpt.cli", "list", str(trained.ckpts)], stdout=child_fd,
                          stderr=subprocess.PIPE, env=env, timeout=120)
    os.close(child_fd)
    out = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        out += chunk
    os.close(main_fd)
    text = out.decode()
    assert proc.returncode == 0, proc.stderr
    assert "┃" in text and "step=000000024" in text and "last" in text


def test_plain_list_says_it_checked_sizes_only_and_verify_finds_changed_bytes(trained, tmp_path):
    copy = tmp_path / "c"
    subprocess.run(["cp", "-r", str(trained.ckpts), str(copy)], check=True)
    weights = copy / "step=000000012" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only a checksum tells
    weights.write_bytes(bytes(data))

    def row(*options: str) -> str:
        listed = run("list", copy, *options)
        assert listed.returncode == 0, listed.stderr
        return next(line for line in listed.stdout.splitlines() if line.startswith("step=000000012"))

    assert "ok (sizes)" in row()  # never a bare "ok": the bytes were not hashed
    assert "damaged: CorruptCheckpointError" in row("--verify")
    assert json.loads(run("list", copy, "--json").stdout)[2]["checked"] == "sizes"


def test_list_of_a_url_names_its_tier_by_the_scheme(capsys, monkeypatch):
    import warnings

    from lightning_ckpt import save_checkpoint
    from lightning_ckpt.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    url = "memory://list-tier/run"
    save_checkpoint({"global_step": 3}, f"{url}/step=000000003")
    for options in ([], ["--json"]):
        with pytest.raises(SystemExit) as done:
            main(["list", url, *options])
        assert done.value.code == 0
    table, doc = capsys.readouterr().out.split("\n[")
    line = table.splitlines()[1]
    assert line.startswith("step=000000003") and " memory " in line and "local" not in line
    assert "ok (manifest)" in line  # a URL's plain list reads the manifests only
    assert json.loads("[" + doc)[0]["tiers"] == ["memory"]
