"""Every code block of README.md and docs/ is run, or checked, by a test (issue 20): what the pages show
is what the package does today.

- python: a page's blocks run in order, in one namespace, in a temporary directory; the names a page
  uses without defining them (`model`, `MyModel`, `opts`, ...) come from its prelude below: tiny
  models that stop themselves after a few steps, a real S3 server on 127.0.0.1 for `s3://bucket`.
- bash: `lightning-ckpt` lines run against the checkpoints the page's python made; `make` targets
  exist in the Makefile, `pip install` extras in pyproject.toml, pytest paths and test names in tests/.
- text: a `$ lightning-ckpt ...` line runs against the checkpoints of `cli_scenario.py` and prints
  what the page shows (times, run ids, sizes and figures masked); directory trees and the manifest
  match a real checkpoint; `$ python examples/rollback.py` is run by tests/rollback/test_example.py.
- yaml: the LightningCLI config trains through LightningCLI.
- A block that cannot run here (it needs several processes, a package not installed, real cloud
  credentials) says why in `<!-- doc-test: not-run: why -->` on the line before it: a python block
  must still compile, a command must still exist, and the test is reported skipped with the reason.
Also: no link leaves the repository, every relative link and anchor resolves, and each page of more
than one section starts with its table of contents.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import tomllib
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from click.testing import CliRunner

from cli_scenario import build as build_cli_scenario
from offline_loggers import mlflow_file_store, stop_wandb, wandb_artifacts, wandb_offline
from doc_pages import PAGES, ROOT, Block, anchor, blocks, headings, links, toc_for
from tiny import CliModel, TinyDataModule, TinyModel, tiny_loader

from lightning_ckpt.cli import main as cli_main

ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


def page(name: str) -> Path:
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


# --- links and tables of contents ------------------------------------------------------------------


@pytest.mark.parametrize("doc", PAGES, ids=lambda p: p.name)
def test_links_stay_in_the_repository_and_resolve(doc: Path) -> None:
    for target in links(doc):
        assert not re.match(r"[a-z][a-z0-9+.-]*:", target), f"{doc.name}: {target} points outside the repository"
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: {target}: no such file"
        assert ROOT in dest.parents or dest == ROOT, f"{doc.name}: {target} leaves the repository"
        if fragment:
            anchors = {anchor(text) for _, text in headings(dest)}
            assert fragment in anchors, f"{doc.name}: {target}: no heading #{fragment} in {dest.name}"


@pytest.mark.parametrize("doc", PAGES, ids=lambda p: p.name)
def test_each_page_of_several_sections_starts_with_its_table_of_contents(doc: Path) -> None:
    if sum(level == 2 for level, _ in headings(doc)) < 2:
        return
    text = doc.read_text()
    toc = toc_for(doc)
    assert toc in text, f"{doc.name}: the table of contents is not\n{toc}"
    assert text.index(toc) < text.index("\n## "), f"{doc.name}: the table of contents is not at the top"


def test_readme_is_short_and_starts_with_install() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    sections = [t for level, t in headings(ROOT / "README.md") if level == 2]
    assert sections[:2] == ["Install", "Quick start"], sections


# --- which test runs each block --------------------------------------------------------------------

NOT_RUN = [b for b in ALL_BLOCKS if b.not_run]


def _kind(block: Block) -> str:
    if block.not_run:
        return "not-run"
    if block.lang == "python":
        return "python"
    if block.lang == "bash":
        return "bash"
    if block.lang == "text" and block.code.startswith("$ lightning-ckpt"):
        return "cli"
    if block.lang == "text" and block.code.startswith("$ python examples/rollback.py"):
        return "rollback-example"
    if block.lang in ("yaml", "json") or (block.lang == "text" and block.page.name == "FORMAT.md"):
        return f"{block.page.name}:{block.lang}"
    return "unknown"


def test_every_block_is_one_the_tests_run_or_check() -> None:
    unknown = [b.where for b in ALL_BLOCKS if _kind(b) == "unknown"]
    assert not unknown, f"blocks no test runs (run them here, or mark them <!-- doc-test: not-run: why -->): {unknown}"
    python_pages = {b.page.name for b in ALL_BLOCKS if _kind(b) == "python"}
    assert python_pages == set(PRELUDES), (
        f"a page with runnable python blocks needs an entry in PRELUDES (the names it uses undefined), and an entry "
        f"needs such a page: {sorted(python_pages ^ set(PRELUDES))}")


# --- python blocks ---------------------------------------------------------------------------------


class _StopsItself:
    """A TinyModel with its own data that stops after `stop_at_step` steps or `stop_after_epochs`
    epochs: the `model`/`MyModel` of the pages, whose Trainers set no limit."""

    stop_at_step: int | None = None
    stop_after_epochs: int | None = None
    batch_size = 8

    def train_dataloader(self):
        return tiny_loader(batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return tiny_loader(seed=1)

    def test_dataloader(self):
        return tiny_loader(seed=2)

    def on_train_batch_end(self, *args: object) -> None:
        if self.stop_at_step is not None and self.global_step >= self.stop_at_step:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        if self.stop_after_epochs is not None and self.current_epoch + 1 >= self.stop_after_epochs:
            self.trainer.should_stop = True


def _model_class(**limits: Any) -> type:
    return type("MyModel", (_StopsItself, TinyModel), dict(limits))


def _common() -> dict[str, Any]:
    return {"L": L, "torch": torch}


def _checkpointer_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    model_class = _model_class(stop_after_epochs=2)
    return {**_common(), "model": model_class(), "MyModel": model_class}


def _migrating_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    from lightning_ckpt import Checkpointer

    model_class = _model_class(stop_at_step=50, batch_size=1)  # 64 batches an epoch: step 50 is in epoch 0
    # runs/exp1/step=000000500: a Checkpointer's save of a model and its datamodule, made short
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Checkpointer(tmp / "made", every_n_steps=2)])
    trainer.fit(model_class(), datamodule=TinyDataModule())
    (tmp / "runs" / "exp1").mkdir(parents=True)
    shutil.copytree(tmp / "made" / "step=000000002", tmp / "runs" / "exp1" / "step=000000500")
    monkeypatch = request.getfixturevalue("monkeypatch")
    wandb_offline(monkeypatch, tmp)  # the loggers' example: W&B offline, MLflow on a file store, here
    mlflow_file_store(monkeypatch, tmp)
    request.addfinalizer(stop_wandb)
    return {**_common(), "model": model_class(), "MyModel": model_class, "MyDataModule": TinyDataModule}


def _remote_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    from s3server import ENV, S3Server

    server = S3Server()
    server.start()
    request.addfinalizer(server.stop)
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in {**ENV, "AWS_ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(key, value)  # what `load_from_checkpoint` of an s3:// URL reads: the backend's env
    import s3fs

    # An s3fs instance an earlier test made with the same arguments (none) is cached with that test's endpoint:
    # drop it now, and the one this page makes with this server's endpoint when the page is done.
    s3fs.S3FileSystem.clear_instance_cache()
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    server.fs().mkdir("bucket")
    model_class = _model_class(stop_at_step=60)
    model = model_class()
    state = {"state_dict": model.state_dict(), "step": 1200}
    return {**_common(), "opts": server.options, "model": model, "MyModel": model_class, "state": state}


def _readme_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return {}  # the quick start defines everything it uses


def _exact_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"MyModel": _model_class()}


def _rollback_prelude(tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return _common()


PRELUDES: dict[str, Callable[[Path, pytest.FixtureRequest], dict[str, Any]]] = {
    "README.md": _readme_prelude,
    "CHECKPOINTER.md": _checkpointer_prelude,
    "MIGRATING.md": _migrating_prelude,
    "REMOTE.md": _remote_prelude,
    "ROLLBACK.md": _rollback_prelude,
    "EXACT_RESUME.md": _exact_prelude,
    # docs/FORMAT.md's two blocks run in tests/format/test_documented_weight_loading.py (tied weights, checked
    # key by key); test_formats_python_blocks_are_the_ones_that_test_runs holds it to every block.
    "FORMAT.md": None,
}

# What each page's run leaves, checked after its blocks ran: the pages' promises, not just "no error".
AFTER: dict[str, Callable[[Path, dict[str, Any]], None]] = {}


def _after(name: str):
    def register(check):
        AFTER[name] = check
        return check
    return register


@_after("README.md")
def _quick_start_resumed(tmp: Path, ns: dict[str, Any]) -> None:
    assert ns["trainer"].global_step == 40 and ns["model"].hparams.lr == 0.1
    from lightning_ckpt import ExactResume

    (exact,) = [c for c in ns["trainer"].callbacks if isinstance(c, ExactResume)]  # the one the Checkpointer added
    assert exact.last_audit.status == "exact"
    assert "resume from step 20 verified exact over 3 steps" in exact.last_audit.message  # as the README says
    run = tmp / "runs" / "quick"
    visible = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))  # not the directory lock
    assert visible == ["exact_resume_audit.json", "ledger.json", "step=000000030", "step=000000040"]
    assert sorted(p.name for p in (run / "step=000000040").iterdir()) == [
        "manifest.json", "model.safetensors", "state.json", "state.safetensors"]  # plain SGD holds no state


@_after("CHECKPOINTER.md")
def _checkpointer_kept_and_tested(tmp: Path, ns: dict[str, Any]) -> None:
    best = ns["ckpt"].best_model_path  # "best" as `trainer.test(ckpt_path="best")` read it
    assert best and (tmp / best).parent == tmp / "runs" / "exp1" and (tmp / best / "manifest.json").is_file()


@_after("MIGRATING.md")
def _plugin_wrote_and_resumed(tmp: Path, ns: dict[str, Any]) -> None:
    assert (tmp / "ckpts" / "epoch=0-step=50.ckpt" / "manifest.json").is_file()
    assert torch.equal(ns["state"]["state_dict"]["inp.weight"], ns["model"].state_dict()["inp.weight"])
    # the loggers' example: what its comments say was uploaded, and what was downloaded is that checkpoint
    assert [a.metadata["original_filename"] for a in wandb_artifacts(tmp)] == ["step=000000025", "step=000000050"]
    assert sorted(p.name for p in (tmp / "runs" / "logged").glob("step=*")) == ["step=000000050"]  # keep_last=1
    from lightning_ckpt import load_checkpoint

    saved = load_checkpoint(tmp / "runs" / "logged" / "step=000000050")["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in ns["loaded"].state_dict().items())
    kept = tmp / "runs" / "logged" / "step=000000050"
    assert sorted(p.name for p in Path(ns["local"]).iterdir()) == sorted(
        ["metadata.yaml", "aliases.txt", *(p.name for p in kept.iterdir())])


@_after("EXACT_RESUME.md")
def _audited_exact(tmp: Path, ns: dict[str, Any]) -> None:
    report = ns["exact"].last_audit
    assert report.status == "exact" and report.steps_compared == 3
    (example,) = [b.code for b in blocks(page("EXACT_RESUME.md")) if b.lang == "python" and "# resume from step" in b.code]
    shown = re.search(r"# (resume from step .*)", example)
    assert report.message == shown.group(1)


@_after("REMOTE.md")
def _remote_resumed(tmp: Path, ns: dict[str, Any]) -> None:
    assert ns["state"]["step"] == 1200 and ns["latest"].endswith("step=000001200")
    assert type(ns["model"]).__name__ == "MyModel"


def _python_pages() -> list[str]:
    return [name for name, prelude in PRELUDES.items() if prelude is not None]


@pytest.mark.parametrize("name", _python_pages())
def test_the_python_blocks_of_each_page_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = PRELUDES[name](tmp_path, request)
    ran = 0
    for block in blocks(page(name)):
        if block.lang == "python" and not block.not_run:
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - our own documentation
            ran += 1
        elif block.lang == "bash" and not block.not_run:
            _check_bash(block, run_cli=True)
    assert ran
    if name in AFTER:
        AFTER[name](tmp_path, namespace)


def test_formats_python_blocks_are_the_ones_that_test_runs() -> None:
    path = ROOT / "tests" / "format" / "test_documented_weight_loading.py"
    spec = importlib.util.spec_from_file_location("_documented_weight_loading", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mine = [b.code for b in blocks(page("FORMAT.md")) if b.lang == "python"]
    assert module._documented_snippets() == mine


@pytest.mark.parametrize("block", NOT_RUN, ids=lambda b: b.where)
def test_a_block_that_cannot_run_here_still_compiles(block: Block) -> None:
    if block.lang == "python":
        compile(block.code, block.where, "exec")
    elif block.lang in ("bash", "text"):
        for command in _commands(block):
            if command[:1] == ["lightning-ckpt"]:
                assert _cli(command[1:2] + ["--help"]).exit_code == 0, command
    pytest.skip(f"{block.where}: {block.not_run}")


# --- bash blocks -----------------------------------------------------------------------------------


def _commands(block: Block) -> list[list[str]]:
    """The commands of a bash block (comments dropped, continuation lines joined) or of a text block's
    `$ ` lines."""
    text = block.code.replace("\\\n", " ")
    lines = text.split("\n")
    if block.lang == "text":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def _cli(args: list[str]):
    return CliRunner().invoke(cli_main, args, catch_exceptions=False)


MAKE_TARGETS = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _check_pytest_args(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("tests/"):
            file, _, name = arg.partition("::")
            assert (ROOT / file).is_file(), arg
            if name:
                function = name.split("[")[0].split("::")[-1]
                assert f"def {function}(" in (ROOT / file).read_text(), arg


def _check_bash(block: Block, run_cli: bool) -> None:
    for command in _commands(block):
        env = [w for w in command if re.match(r"^[A-Z_]+=", w)]
        command = command[len(env):]
        for assignment in env:  # a variable the docs set must be one the code reads
            var = assignment.split("=")[0]
            sources = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("lightning_ckpt/**/*.py")]
            assert any(var in p.read_text() for p in sources), f"{block.where}: nothing reads {var}"
        program = command[0]
        if program == "make":
            assert set(command[1:]) <= MAKE_TARGETS, f"{block.where}: {command}"
        elif program == "pip":
            assert command[:2] == ["pip", "install"], command
            for requirement in command[2:]:
                m = re.fullmatch(r"([a-z-]+)(?:\[([a-z0-9,]+)\])?", requirement)
                assert m and m.group(1) == PYPROJECT["name"], requirement
                for extra in (m.group(2) or "").split(","):
                    assert not extra or extra in PYPROJECT["optional-dependencies"], f"{block.where}: no extra {extra}"
        elif program.endswith("python") and command[1:3] == ["-m", "pytest"]:
            _check_pytest_args(command[3:])
        elif program == "lightning-ckpt":
            result = _cli(command[1:] if run_cli else command[1:2] + ["--help"])
            assert result.exit_code == 0, f"{block.where}: {command}: {result.output}"
            assert result.stdout.strip(), command
        else:
            raise AssertionError(f"{block.where}: no check for {command}")


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if _kind(b) == "bash" and b.page.name not in PRELUDES],
                         ids=lambda b: b.where)
def test_bash_blocks_name_commands_that_exist(block: Block) -> None:
    _check_bash(block, run_cli=False)


# --- the command line's printed examples -----------------------------------------------------------


def _masked(text: str) -> list[str]:
    """Output with what changes from run to run masked: times, run ids, sizes, figures, versions."""
    out = []
    for line in text.strip("\n").split("\n"):
        line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", "<time>", line)
        line = re.sub(r"\b[0-9a-f]{12}\b", "<run>", line)
        line = re.sub(r"\b[0-9a-f]{32}\b", "<digest>", line)  # a checksum an error names: the bytes' own
        line = re.sub(r"\d+(\.\d+)? (B|KiB|MiB|GiB)\b", "<size>", line)
        line = re.sub(r"\d+\.\d+(\.\d+)*\S*", "<num>", line)
        line = re.sub(r"\(\d+ bytes", "(<n> bytes", line)
        out.append(" ".join(line.split()))
    return out


def _shown(block: Block) -> list[tuple[list[str], str]]:
    """Each `$ ` command of a text block and the output shown under it."""
    pairs: list[tuple[list[str], str]] = []
    for line in block.code.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            pairs.append((shlex.split(line[2:], comments=True), ""))
        else:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + line + "\n")
    return pairs


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_docs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_cli_scenario(Path("."))
    finally:
        os.chdir(cwd)
    return root


def _damaged(cli_dir: Path):
    """`verify`'s example is shown after one byte of step 24's model.safetensors changed."""
    target = cli_dir / "ckpt" / "step=000000024" / "model.safetensors"
    original = target.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 1
    target.write_bytes(bytes(damaged))
    return lambda: target.write_bytes(original)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if _kind(b) == "cli"], ids=lambda b: b.where)
def test_each_printed_command_prints_what_the_page_shows(block: Block, cli_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cli_dir)
    for command, shown in _shown(block):
        assert command[0] == "lightning-ckpt", command
        undo = _damaged(cli_dir) if command[1] == "verify" else (lambda: None)
        try:
            result = _cli(command[1:])
        finally:
            undo()
        printed = result.stdout + result.stderr
        assert _masked(printed) == _masked(shown), f"{block.where}: $ {shlex.join(command)}\n{printed}"
        for made in ("ckpt2", "back.ckpt", "model.safetensors", "hf"):  # let the block run again
            path = cli_dir / made
            if made in command and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- trees, the manifest, the LightningCLI config --------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_ckpt import Checkpointer

    root = tmp_path_factory.mktemp("one")
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Checkpointer(root, every_n_steps=2)])
    trainer.fit(TinyModel(), tiny_loader())
    return root / "step=000000002"


def test_formats_trees_name_the_files_a_checkpoint_holds(one_checkpoint: Path, tmp_path: Path) -> None:
    from lightning_ckpt import save_checkpoint

    tree, incremental = [b for b in blocks(page("FORMAT.md")) if b.lang == "text"]
    listed = re.findall(r"^  (\S+)", tree.code, re.M)
    assert sorted(listed) == sorted(p.name for p in one_checkpoint.iterdir())
    big = torch.zeros(128, 128)  # 64 KiB: a file of its own
    save_checkpoint({"state_dict": {"backbone.0.weight": big, "head.bias": torch.zeros(4)},
                     "optimizer_states": [{"state": {0: {"exp_avg": big + 1}}}], "extra": torch.zeros(2)},
                    tmp_path / "inc", incremental=True)
    listed = re.findall(r"^  (\S+)", incremental.code, re.M)
    assert sorted({name.split("/")[0] for name in listed}) == sorted(p.name for p in (tmp_path / "inc").iterdir())
    assert len(list((tmp_path / "inc" / "blobs").iterdir())) == 2


def test_formats_manifest_has_the_keys_of_a_real_one(one_checkpoint: Path) -> None:
    (shown,) = [b for b in blocks(page("FORMAT.md")) if b.lang == "json"]
    example = json.loads(shown.code.replace("…", ""))
    real = json.loads((one_checkpoint / "manifest.json").read_text())
    assert list(example) == list(real)
    assert set(example["versions"]) == set(real["versions"])
    assert all(set(v) == {"size", "digest"} for v in real["files"].values())
    assert example["format_version"] == real["format_version"] and example["hash"] == real["hash"]


def test_the_lightningcli_config_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    (config,) = [b for b in blocks(page("CHECKPOINTER.md")) if b.lang == "yaml"]
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text(config.code)
    LightningCLI(CliModel, TinyDataModule, args=["fit", "--config=config.yaml", "--trainer.max_steps=4",
                                                 "--trainer.logger=false", "--trainer.enable_progress_bar=false"],
                 save_config_callback=None)
    assert (tmp_path / "runs" / "exp1" / "step=000000004" / "manifest.json").is_file()
