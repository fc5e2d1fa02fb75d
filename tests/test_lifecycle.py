"""The stage lifecycle (`RunDir.stage` -> `Stage`), the one path every stage takes: each
promise of the run directory tested once here, for all stages, plus a scan that no stage
keeps a bookkeeping of its own.

begin -> skip (only what is whole) or resume (same config, partial work kept) -> wipe
(what another config or a fresh start left) -> units -> verify -> finish (only this
process's record, outputs recorded, only after the work returned normally)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raybias.config import load_config
from raybias.rundir import ResumeRefused, RunDir, StageFailed

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SECTIONS = ("data",)


def _cfg(**data):
    return load_config(QUICKSTART, [f"data.{k}={v}" for k, v in data.items()])


def _work(run: RunDir, name: str = "out/table.txt", text: str = "rows\n") -> str:
    run.write_text(name, text)
    return name


def test_a_stage_finishes_only_when_its_work_returns_and_records_its_outputs(tmp_path):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    with pytest.raises(RuntimeError, match="boom"):
        with run.stage("s", cfg, SECTIONS, outputs=("out/table.txt",)) as st:
            _work(run)
            raise RuntimeError("boom")
    assert not run.is_done("s") and not st.finished
    with run.stage("s", cfg, SECTIONS, "auto", outputs=("out/table.txt",)) as st:
        assert not st.skip
        _work(run)
    rec = run.stage_record("s")
    assert rec["done"] and rec["outputs"]["out/table.txt"]["bytes"] == len("rows\n")
    again = run.stage("s", cfg, SECTIONS, "auto")
    assert again.skip and run.is_done("s")


def test_an_output_missing_at_finish_marks_nothing_done(tmp_path):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    st = run.stage("s", cfg, SECTIONS, outputs=("out/never-written.txt",))
    with pytest.raises(StageFailed, match="does not exist; nothing is marked done"):
        st.finish({"n": 1})
    assert not run.stage_record("s")["done"]


@pytest.mark.parametrize("damage", ["delete", "truncate", "grow"])
def test_a_finished_stage_whose_outputs_were_damaged_is_done_again(tmp_path, damage):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    with run.stage("s", cfg, SECTIONS, outputs=("out/table.txt",), owns=("out",)):
        _work(run)
    path = Path(run.path("out/table.txt"))
    if damage == "delete":
        path.unlink()
    else:
        path.write_text("r\n" if damage == "truncate" else "rows and more\n")
    st = run.stage("s", cfg, SECTIONS, "resume", outputs=("out/table.txt",), owns=("out",))
    assert not st.skip and not run.is_done("s")
    assert not path.exists()  # a whole-table stage wipes what it owns before redoing it


def test_verify_decides_skip_and_a_partial_stage_keeps_its_whole_units(tmp_path):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    with run.stage("s", cfg, SECTIONS, partial=True, owns=("units",)) as st:
        for u in ("u0", "u1", "u2"):
            run.write_text(f"units/{u}", u)
        st.finish(units=["u0", "u1", "u2"])
    Path(run.path("units/u1")).unlink()

    def whole():
        missing = [u for u in ("u0", "u1", "u2") if not run.exists("units", u)]
        return f"{len(missing)} unit(s) missing" if missing else None

    st = run.stage("s", cfg, SECTIONS, "auto", partial=True, owns=("units",), verify=whole)
    assert not st.skip and st.resumable
    assert sorted(run.listdir("units")) == ["u0", "u2"]  # kept: only the missing unit is redone
    run.write_text("units/u1", "u1")
    st.finish(units=["u0", "u1", "u2"])
    assert run.stage("s", cfg, SECTIONS, "auto", partial=True, verify=whole).skip


def test_resume_continues_units_of_the_same_config_and_wipes_another_configs(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    a, b = _cfg(seed=1), _cfg(seed=2)
    with pytest.raises(KeyboardInterrupt):
        with run.stage("s", a, SECTIONS, partial=True, owns=("units",)) as st:
            run.write_text("units/u0", "a")
            st.unit_done("u0")
            raise KeyboardInterrupt  # killed mid-stage
    st = run.stage("s", a, SECTIONS, "resume", partial=True, owns=("units",))
    assert st.resumable and st.done_units == ["u0"] and run.exists("units", "u0")
    with pytest.raises(ResumeRefused, match="seed"):
        run.stage("s", b, SECTIONS, "resume", partial=True, owns=("units",))
    assert run.exists("units", "u0")  # a refusal deletes nothing
    st = run.stage("s", b, SECTIONS, "auto", partial=True, owns=("units",))
    assert not st.resumable and st.done_units == [] and not run.exists("units", "u0")
    st = run.stage("s", b, SECTIONS, "fresh", partial=True, owns=("units",))
    assert not st.resumable


def test_only_the_writer_that_began_a_stage_can_finish_it(tmp_path):
    cfg_a, cfg_b = _cfg(seed=1), _cfg(seed=2)
    a, b = RunDir(str(tmp_path / "r")), RunDir(str(tmp_path / "r"))
    st_a = a.stage("s", cfg_a, SECTIONS, partial=True)
    st_b = b.stage("s", cfg_b, SECTIONS, partial=True)  # another process began it again since
    with pytest.raises(StageFailed, match="began it again"):
        st_a.unit_done("u0")
    with pytest.raises(StageFailed, match="began it again"):
        st_a.finish()
    assert not a.stage_record("s")["done"]
    st_b.finish()
    assert RunDir(str(tmp_path / "r")).is_done("s")
    assert b.stage_record("s")["values"]["data.seed"] == 2


def test_a_skipped_stage_cannot_be_finished_and_leaves_its_record(tmp_path):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    with run.stage("s", cfg, SECTIONS, outputs=("out/table.txt",)) as st:
        _work(run)
        st.info = {"n": 3}
    before = run.stage_record("s")
    with run.stage("s", cfg, SECTIONS, "auto") as st:
        assert st.skip and st.record_info == {"n": 3}
        with pytest.raises(StageFailed, match="skipped"):
            st.finish()
    assert run.stage_record("s") == before


# --- one lifecycle, every stage -----------------------------------------------------------

STAGE_CODE = sorted({*(REPO / "raybias" / "stages").glob("*.py"), REPO / "raybias" / "classify" / "runner.py"})


def test_no_stage_keeps_a_bookkeeping_of_its_own():
    """Only rundir.py touches the manifest's records: every stage goes through `run.stage`."""
    primitives = re.compile(r"\.(begin_stage|finish_stage|mark_units|_save_manifest|_manifest_locked)\(")
    offenders = []
    for path in sorted((REPO / "raybias").rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if primitives.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    users = [p.name for p in STAGE_CODE if "run.stage(" in p.read_text()]
    for expected in ("prepare.py", "embed.py", "cluster.py", "base.py", "finetune.py", "generate.py",
                     "filter.py", "ddb.py", "runner.py"):
        assert expected in users, expected


def test_fault_hooks_are_inert_unless_a_test_arms_one(monkeypatch):
    """The suite's fault injection lives in raybias/faults.py alone and does nothing unarmed."""
    from raybias import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.planned("finetune.step", ["g0", "lora/g0"], marker="/x") is None
    faults.strike(None, 10**6)  # a worker handed no fault goes on
    faults.arm(monkeypatch, "train.epoch", "erm/0", 2)
    assert faults.planned("train.epoch", ["erm/1"]) is None
    fault = faults.planned("train.epoch", ["erm/0"])
    faults.strike(fault, 1)  # not due yet
    faults.strike(fault, 5, first_session=False)  # a restored session trains on
    with pytest.raises(RuntimeError, match="injected failure after 2"):
        faults.strike(fault, 2)
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm(monkeypatch, "generate.unit", "x", 1)
    readers = [p.relative_to(REPO) for p in (REPO / "raybias").rglob("*.py")
               if "RAYBIAS_FAULTS" in p.read_text() or "inject" in p.read_text().lower()]
    assert [str(p) for p in readers] == ["raybias/faults.py"]


def test_a_same_length_edit_of_a_recorded_file_is_seen(tmp_path):
    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    with run.stage("s", cfg, SECTIONS, outputs=("out/table.txt",)):
        _work(run, text='{"n_classes": 2}')
    Path(run.path("out/table.txt")).write_text('{"n_classes": 9}')
    assert "content differs" in run.outputs_problem(run.stage_record("s"))
    assert not run.stage("s", cfg, SECTIONS, "auto", outputs=("out/table.txt",)).skip


def test_a_stage_refuses_inputs_that_are_unfinished_or_damaged_before_touching_its_record(tmp_path):
    from raybias.rundir import InputMissing

    run, cfg = RunDir(str(tmp_path / "r")), _cfg()
    run.stage("up", cfg, SECTIONS)  # begun, never finished
    with pytest.raises(InputMissing, match=r"stage 'up' .* has not finished \(run `raybias up` first"):
        run.stage("down", cfg, SECTIONS, needs=("up",))
    assert run.stage_record("down") is None
    with run.stage("up", cfg, SECTIONS, outputs=("out/table.txt",)):
        _work(run)
    with run.stage("down", cfg, SECTIONS, needs=("up",), outputs=("out/down.txt",)):
        _work(run, "out/down.txt")
    before = run.stage_record("down")
    Path(run.path("out/table.txt")).write_text("")
    with pytest.raises(InputMissing, match=r"table.txt has 0 bytes where 5 were written: stage 'up' must be made again"):
        run.stage("down", cfg, SECTIONS, "auto", needs=("up",))
    assert run.stage_record("down") == before
    run.stage("other", cfg, SECTIONS, needs=("never-recorded",)).finish()  # left to its readers


@pytest.mark.parametrize("content,words", [
    ("[]", "a JSON list"), ('{"source": 5}', "missing"), ("not json", "not JSON"),
])
def test_a_damaged_info_json_is_one_line_naming_it(tmp_path, content, words):
    from raybias.data.info import DatasetInfo

    run = RunDir(str(tmp_path / "r"))
    run.write_text("data/info.json", content)  # no prepare record: the file itself is checked
    with pytest.raises(StageFailed, match=words):
        DatasetInfo.load(run)


def test_an_info_json_with_a_wrong_type_is_refused_naming_the_field(tmp_path):
    from dataclasses import asdict

    from raybias.data.info import DatasetInfo

    good = DatasetInfo(source="colored_digits", n_classes=2, n_bias=2, class_names=["a", "b"], bias_names=["r", "g"],
                       class_words=[["a"], ["b"]], bias_words=["red", "green"], prompt_template="{member}",
                       aligned=[0, 1], image_size=16, severity=0.95)
    run = RunDir(str(tmp_path / "r"))
    run.write_json("data/info.json", asdict(good))
    assert DatasetInfo.load(run) == good
    run.write_json("data/info.json", dict(asdict(good), n_classes="two", severity="high"))
    with pytest.raises(StageFailed, match="wrong type for n_classes, severity"):
        DatasetInfo.load(run)
