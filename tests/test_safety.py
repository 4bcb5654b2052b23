"""Never lose a user's work: output folders belong to one run, --resume continues only the run of its
checkpoint, one run per folder at a time, every number checked up front. The cases are numbered by class.

Most checks happen before any model is loaded, so they are tested by calling the scripts' main in this process with
`common.init_distributed` replaced (nothing distributed starts) and model loading replaced by a sentinel that says
"all checks passed"; a few real runs (subprocesses) give the folders and reproduce what needs a real process."""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, read_metrics, run_script, script_env

import chat
import common
import common.flags
import common.engines
import common.launcher
import common.runs
import common.toy
import ppo
import reward
import sft


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n):
    return [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
            for r in common.toy.toy_data("sft", "train")[:n]]


def snapshot(folder) -> dict:
    """Every file under a folder with a hash of its bytes (not the lock a run holds while it runs)."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(folder).rglob("*")) if f.is_file() and f.name != common.runs.LOCK}


def one_line_error(excinfo_or_text, *needles):
    text = str(excinfo_or_text.value.code) if hasattr(excinfo_or_text, "value") else excinfo_or_text
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert all(n in lines[0] for n in needles), (lines[0], needles)
    return lines[0]


class ModelsWouldLoadNow(Exception):
    """Raised where a script would load its first model: every check before it has passed."""


@pytest.fixture
def no_models(monkeypatch):
    """Run a script's main in this process up to its first model load, with no process group."""
    monkeypatch.setattr(common, "init_distributed", lambda: torch.device("cpu"))

    def stop(*a, **k):
        raise ModelsWouldLoadNow

    monkeypatch.setattr(common, "load_causal_lm", stop)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)


SFT_FLAGS = ["--per_device_batch_size", "4", "--max_steps", "6", "--save_every", "2", "--eval_every", "0",
             "--eval_fraction", "0", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def sft_run(tiny_models, tmp_path_factory):
    """A finished sft.py run (6 steps, checkpoints at 2 and 4, no eval set) on a tiny GPT-2, and its flags."""
    d = tmp_path_factory.mktemp("safety")
    data = write_jsonl(d / "train.jsonl", sft_rows(24))
    flags = ["--model", tiny_models["gpt2"], "--data", str(data), *SFT_FLAGS]
    run_script("sft.py", *flags, "--output_dir", d / "run")
    return d / "run", flags


def sft_args(flags: list, **changes) -> sft.Args:
    """sft.Args from a command line (tyro, as the script parses it), with fields changed."""
    import tyro

    return dataclasses.replace(tyro.cli(sft.Args, args=list(map(str, flags)), use_underscores=True), **changes)


def copy_run(run, tmp_path, finished: bool = False) -> Path:
    """A copy of a run; by default as if killed after its last checkpoint (not finished)."""
    out = Path(shutil.copytree(run, tmp_path / "run"))
    saved = json.loads((out / "args.json").read_text())
    if not finished and saved["_run"].pop("finished", None):
        (out / "args.json").write_text(json.dumps(saved, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1-5: an output folder is only written by the run that owns it


def test_1_output_dir_that_is_or_holds_an_input_is_refused(tiny_models, tmp_path):
    """`sft.py --model X --output_dir X --overwrite` wiped X after loading it; `--data run/train.jsonl --output_dir
    run --overwrite` deleted train.jsonl. Both are refused before anything is read, and nothing changes."""
    model = Path(shutil.copytree(tiny_models["gpt2"], tmp_path / "model"))
    (model / "args.json").write_text(json.dumps({"_run": {"script": "sft.py"}}))  # even one of our runs
    before = snapshot(tmp_path)
    with pytest.raises(common.UserError) as e:
        sft.main(sft.Args(model=str(model), output_dir=str(model), overwrite=True))
    one_line_error(e, "--output_dir", "holds --model", "an input of this run")
    (tmp_path / "run").mkdir()
    data = write_jsonl(tmp_path / "run" / "train.jsonl", sft_rows(4))
    before = snapshot(tmp_path)
    with pytest.raises(common.UserError) as e:
        sft.main(sft.Args(model=str(model), data=str(data), output_dir=str(tmp_path / "run"), overwrite=True))
    one_line_error(e, "holds --data")
    run = tmp_path / "run"
    for kwargs, out in (({"data": data}, run), ({"eval_data": data}, run), ({"ptx_data": data}, run),
                        ({"ref": model}, model), ({"critic": model}, model), ({"reward": model}, model)):
        flag = next(iter(kwargs))
        with pytest.raises(common.UserError) as e:  # every input of ppo.py too
            ppo.main(ppo.Args(actor=tiny_models["llama"], output_dir=str(out), overwrite=True,
                              **{"reward": tiny_models["llama"]} | {k: str(v) for k, v in kwargs.items()}))
        one_line_error(e, f"holds --{flag}", "an input of this run")
    assert snapshot(tmp_path) == before


def test_1_an_output_dir_that_cannot_be_made_is_one_line_before_loading(tmp_path, no_models):
    """An --output_dir under a file, a link to nothing, a name too long: tracebacks (NotADirectoryError,
    FileExistsError, OSError) after the models had loaded. Now one line first; and where only making it shows the
    problem (/proc here; a read-only mount), one line from start_output_dir. A resumed run removes staging folders
    that a killed save left."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, needle in ((tmp_path / "afile" / "sub", "afile is a file; expected a folder"),
                        (tmp_path / "dangling", "which does not exist"), (tmp_path / ("a" * 300), "name too long")):
        with pytest.raises(common.UserError) as e:
            sft.main(sft.Args(output_dir=str(out)))
        one_line_error(e, f"--output_dir {out}", needle)
    with pytest.raises(common.UserError) as e:
        common.runs.start_output_dir("/proc/hackable_rlhf_test", sft.Args(), False, False)
    one_line_error(e, "--output_dir /proc/hackable_rlhf_test: ")
    # a save killed half-way left a staging folder (a whole model) that no later run removed, but --overwrite
    run = tmp_path / "run"
    common.runs.start_output_dir(str(run), sft.Args(), False, False, {"script": "sft.py"})
    for stage in (run / ".staging-123", run / "ema" / ".staging-123"):
        stage.mkdir(parents=True)
        (stage / "model.safetensors").write_text("x")
    common.launcher._release_lock(run / common.runs.LOCK, os.getpid())
    common.runs.start_output_dir(str(run), sft.Args(), False, True, {"script": "sft.py"})
    assert not list(run.glob("**/.staging-*")) and (run / "ema").is_dir() and (run / "args.json").exists()


def test_2_resume_into_a_folder_that_is_not_a_run_is_refused(tiny_models, tmp_path):
    """--resume into a plain HF model folder replaced its model.safetensors."""
    model = Path(shutil.copytree(tiny_models["gpt2"], tmp_path / "model"))
    before = snapshot(model)
    with pytest.raises(common.UserError) as e:
        sft.main(sft.Args(output_dir=str(model), resume=True))
    one_line_error(e, "--resume only takes a run of these scripts", "has no args.json")
    with pytest.raises(common.UserError) as e:  # nor a run of another script
        (model / "args.json").write_text(json.dumps({"_run": {"script": "reward.py"}}))
        sft.main(sft.Args(output_dir=str(model), resume=True))
    one_line_error(e, "holds a run of reward.py, not of sft.py")
    with pytest.raises(common.UserError) as e:
        sft.main(sft.Args(output_dir=str(tmp_path / "empty"), resume=True))
    one_line_error(e, "holds no run to continue")
    (model / "args.json").unlink()
    assert snapshot(model) == before and not (tmp_path / "empty").exists()


def test_3_overwrite_removes_only_the_files_of_a_run(sft_run, tmp_path):
    """--overwrite deleted every file of the folder, a data file kept there included. Now it removes only what the
    scripts write, and only in a folder whose args.json they wrote."""
    run = copy_run(sft_run[0], tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "mydata").mkdir()
    (run / "mydata" / "train.jsonl").write_text("{}\n")
    args = sft_args(sft_run[1], output_dir=str(run), overwrite=True)
    common.runs.prepare_output_dir(str(run), True, False, "sft.py", {"--data": args.data})
    common.runs.start_output_dir(str(run), args, True, False, {"script": "sft.py"})
    common.launcher._release_lock(run / common.runs.LOCK, os.getpid())
    assert sorted(f.name for f in run.iterdir()) == ["args.json", "mydata", "notes.txt"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "mydata" / "train.jsonl").exists()
    assert json.loads((run / "args.json").read_text())["_run"] == {"script": "sft.py",
                                                                   "inputs": common.runs.fingerprints(args)}
    foreign = tmp_path / "foreign"  # an args.json that is not ours: nothing is removed
    foreign.mkdir()
    (foreign / "args.json").write_text("{}")
    (foreign / "model.safetensors").write_text("x")
    with pytest.raises(common.UserError) as e:
        common.runs.prepare_output_dir(str(foreign), True, False, "sft.py")
    one_line_error(e, "--overwrite only takes a run of these scripts", "args.json they did not write")
    assert (foreign / "model.safetensors").exists()


def test_4_resume_without_a_checkpoint_is_refused(sft_run, tmp_path):
    """--resume on a run without checkpoints (or with `latest` deleted) restarted from step 0 and replaced the model
    and metrics; a `latest` that names a missing tag was a traceback."""
    run = copy_run(sft_run[0], tmp_path)
    (run / "checkpoints" / "latest").unlink()
    before = snapshot(run)
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True))
    one_line_error(e, "has no checkpoint to continue from", "pass --overwrite to start the run again")
    (run / "checkpoints" / "latest").write_text("step9")
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True))
    one_line_error(e, "latest names checkpoint 'step9', which is not there")
    (run / "checkpoints" / "latest").unlink()
    assert snapshot(run) == before


def test_5_a_run_shorter_than_its_checkpoint_is_refused(sft_run, tmp_path, no_models):
    """`--resume --max_steps 4` at a step-4 checkpoint replaced the finished step-6 model with step-4 weights and
    deleted metric rows 5-6 (sft.py, ppo.py). A run shorter than before but past the checkpoint is a change to accept
    by name; a longer one continues."""
    run = copy_run(sft_run[0], tmp_path)
    before = snapshot(run)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step4"
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=4))
    one_line_error(e, "the checkpoint is at 4, this run ends at 4", "would replace the model with an older one")
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=5))
    one_line_error(e, "total_steps 6 -> 5", "--resume_changes total_steps")
    with pytest.raises(ModelsWouldLoadNow):  # accepted, or longer: every check passes
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=5, resume_changes=("total_steps",)))
    with pytest.raises(ModelsWouldLoadNow):
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=9))
    assert snapshot(run) == before  # args.json too: it is written after the checks
    (run / "checkpoints" / "latest").write_text("step6")  # a run whose last checkpoint is its end: finished
    (run / "checkpoints" / "step6").mkdir()
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True))
    one_line_error(e, "the run finished", "total_steps 6", "nothing is left to train")


# ----------------------------------------------------------------------------------------------------------------
# 6: a resumed run is the same run


@pytest.mark.parametrize("change", [
    {"learning_rate": 2e-3}, {"per_device_batch_size": 2}, {"seed": 1}, {"lr_scheduler": "linear"},
    {"data": "other"}, {"zero_stage": 2}, {"lora_rank": 4}])
def test_6_resume_with_other_flags_is_refused_by_name(sft_run, tmp_path, no_models, change):
    """--resume after changing --learning_rate, --per_device_batch_size, --data, --seed, --lr_scheduler was silently
    another run, and args.json was rewritten first; a ZeRO stage change was a traceback. Now: one line naming the
    flags; args.json untouched; accepted with --resume_changes NAME, except what the checkpoint cannot be loaded
    without."""
    run = copy_run(sft_run[0], tmp_path)
    if "data" in change:
        change = {"data": str(write_jsonl(tmp_path / "other.jsonl", sft_rows(24)))}
    before = snapshot(run)
    name = {"per_device_batch_size": "global_batch"}.get(next(iter(change)), next(iter(change)))
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, **change))
    if name in ("zero_stage", "lora_rank"):
        one_line_error(e, "cannot be loaded with another", name)
        with pytest.raises(common.UserError):
            sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, resume_changes=(name,), **change))
    else:
        one_line_error(e, "this is not the run of the checkpoint", name, f"--resume_changes {name}")
        with pytest.raises(ModelsWouldLoadNow):
            sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, resume_changes=(name,), **change))
    assert snapshot(run) == before


def test_6_an_accepted_learning_rate_change_is_the_one_used(tmp_path):
    """--resume --resume_changes learning_rate (or weight_decay): args.json said the new value, but the optimizer and
    scheduler states loaded from the checkpoint kept the old ones (train/lr went on at the old peak). Now
    common.runs.load_checkpoint puts the new ones in: the schedule goes on from the checkpoint's step at the new peak.
    (A stand-in engine whose load restores a run at step 5 of 8 with lr 1e-3; sft.py, reward.py and ppo.py pass
    their flags when named in --resume_changes.)"""
    schedule = common.lr_lambda("cosine", 2, 8)

    class Engine:
        def __init__(self):
            self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

        def load_checkpoint(self, folder, tag):  # the checkpoint's states: 5 steps at lr 1e-3
            for _ in range(5):
                self.optimizer.step()
                self.lr_scheduler.step()
            return folder, {"step": 5}

    old = Engine()
    assert common.runs.load_checkpoint(old, str(tmp_path), "step5") == {"step": 5}
    assert old.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * schedule(5))  # unchanged without the names
    new = Engine()
    common.runs.load_checkpoint(new, str(tmp_path), "step5", learning_rate=2e-3, weight_decay=0.1)
    group = new.optimizer.param_groups[0]
    assert group["lr"] == new.lr_scheduler.get_last_lr()[0] == pytest.approx(2e-3 * schedule(5))
    assert group["weight_decay"] == 0.1
    for step in (6, 7):
        new.optimizer.step()
        new.lr_scheduler.step()
        assert group["lr"] == pytest.approx(2e-3 * schedule(step))


def test_6_a_resumed_run_rewrites_args_json_only_once_it_has_saved(sft_run, tmp_path):
    """--resume wrote the new args.json at start-up: killed before its first save (or stopped early), the folder held
    the old model under an args.json of a run that never happened, and the next --resume was compared with that. Now
    the new arguments wait beside it (args.json.next) until the run saves a checkpoint or its model."""
    run = copy_run(sft_run[0], tmp_path)
    before = (run / "args.json").read_text()
    args = sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=8, resume_changes=("total_steps",))
    common.runs.start_output_dir(str(run), args, False, True, {"script": "sft.py"})
    common.launcher._release_lock(run / common.runs.LOCK, os.getpid())
    assert (run / "args.json").read_text() == before and json.loads((run / "args.json.next").read_text())[
        "max_steps"] == 8
    common.runs.commit_args(str(run))  # what a checkpoint or the final save does
    assert json.loads((run / "args.json").read_text())["max_steps"] == 8 and not (run / "args.json.next").exists()


def test_6_resume_compares_ranks_through_the_global_batch(tmp_path):
    """Same global batch on other ranks: the same run (ZeRO-0); under ZeRO-1..3 the optimizer state is split over
    the ranks, so a 2-rank ZeRO-2 checkpoint on 1 rank (a traceback before) is refused."""
    saved = {"script": "sft.py", "world_size": 2, "global_batch": 16, "train_examples": 96, "total_steps": 12}
    out = tmp_path / "run"
    out.mkdir()
    for stage in (0, 2):
        args = sft.Args(output_dir=str(out), zero_stage=stage)
        (out / "args.json").write_text(json.dumps(vars(args) | {"_run": saved}))
        now = saved | {"world_size": 1}
        fixed = ("zero_stage",) + (("world_size",) if stage else ())
        if stage == 0:
            common.runs.check_resume(str(out), args, "step4", now, "total_steps", fixed)
        else:
            with pytest.raises(common.UserError) as e:
                common.runs.check_resume(str(out), args, "step4", now, "total_steps", fixed)
            one_line_error(e, "cannot be loaded with another world_size (2 -> 1)")
        with pytest.raises(common.UserError) as e:
            common.runs.check_resume(str(out), args, "step4", saved | {"global_batch": 8}, "total_steps",
                                fixed)
        one_line_error(e, "global_batch 16 -> 8")


def test_6_resume_with_the_values_the_defaults_took_is_the_same_run(sft_run, tmp_path, no_models):
    """A flag whose default is worked out at start-up (--max_seq_len: the model's context; --learning_rate: the
    script's rate) is compared as worked out: a resume that passes the value it took is the same run, not
    "max_seq_len None -> 256"."""
    run = copy_run(sft_run[0], tmp_path)
    saved = json.loads((run / "args.json").read_text())
    assert saved["max_seq_len"] is None  # the first run did not pass it
    took = saved["_run"]["max_seq_len"]
    args = sft_args(sft_run[1], output_dir=str(run), resume=True)
    with pytest.raises(ModelsWouldLoadNow):  # every check passed
        sft.main(dataclasses.replace(args, max_seq_len=took))
    with pytest.raises(common.UserError) as e:  # another value is another run, named with the value it took
        sft.main(dataclasses.replace(args, max_seq_len=took // 2))
    one_line_error(e, "this is not the run of the checkpoint", f"max_seq_len {took} -> {took // 2}")

def test_6_resume_with_the_same_paths_written_otherwise_is_the_same_run(sft_run, tmp_path, no_models):
    """`--model sft1` then `--model ./sft1/` is the same run, not another ("model sft1 -> ./sft1/")."""
    run = copy_run(sft_run[0], tmp_path)
    args = sft_args(sft_run[1], output_dir=str(run), resume=True)
    data = Path(args.data)
    with pytest.raises(ModelsWouldLoadNow):  # every check passed
        sft.main(dataclasses.replace(args, model=args.model + "/", data=str(data.parent / "." / data.name)))
    with pytest.raises(common.UserError) as e:  # another file is still another run
        sft.main(dataclasses.replace(args, data=str(write_jsonl(tmp_path / "other.jsonl", sft_rows(24)))))
    one_line_error(e, "this is not the run of the checkpoint", "data")


def test_6_ppo_resume_with_another_kl_coef_is_refused(tiny_models, tmp_path, no_models):
    """ppo.py --resume with another --kl_coef was ignored (metrics bit-identical): now refused by name."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"tell me about {t}"} for t in common.toy.TOPICS])
    model = tiny_models["llama"]
    args = ppo.Args(actor=model, reward=model, data=str(data), output_dir=str(tmp_path / "run"), rollout_batch_size=4,
                    per_device_batch_size=4, max_new_tokens=8, max_seq_len=64)
    run = {"script": "ppo.py", "world_size": 1, "rollout_batch": 4, "mini_batch": 4, "prompts": 23,
           "actor_stage": 0, "critic_stage": 0, "iterations": 5}
    common.runs.start_output_dir(args.output_dir, args, False, False, run)
    common.launcher._release_lock(tmp_path / "run" / common.runs.LOCK, os.getpid())
    for model_kind in ("actor", "critic"):
        (tmp_path / "run" / "checkpoints" / model_kind / "iter4").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / model_kind / "latest").write_text("iter4")
    before = snapshot(tmp_path / "run")
    with pytest.raises(common.UserError) as e:
        ppo.main(dataclasses.replace(args, resume=True, kl_coef=0.1, cliprange=0.1))
    one_line_error(e, "kl_coef 0.05 -> 0.1", "cliprange 0.2 -> 0.1", "--resume_changes kl_coef cliprange")
    with pytest.raises(common.UserError) as e:  # 4 iterations at an iteration-4 checkpoint
        ppo.main(dataclasses.replace(args, resume=True, total_episodes=16))
    one_line_error(e, "the checkpoint is at 4, this run ends at 4 (iterations)")
    with pytest.raises(ModelsWouldLoadNow):
        ppo.main(dataclasses.replace(args, resume=True, kl_coef=0.1, resume_changes=("kl_coef",)))
    assert snapshot(tmp_path / "run") == before


# ----------------------------------------------------------------------------------------------------------------
# 7: a stale DeepSpeed op-build lock


def test_7_a_stale_op_build_lock_does_not_hang_start_up(tmp_path):
    """A kill during DeepSpeed's CPU op build (deepspeed_shm_comm, compiled at init_distributed) left a `lock` in
    torch_extensions, and every later run waited on it forever. That op serves only tensor-parallel inference, so
    it is not built: start-up ignores the lock."""
    for d in (tmp_path / "deepspeed_shm_comm", tmp_path / "py311_cpu" / "deepspeed_shm_comm"):
        d.mkdir(parents=True)
        (d / "lock").write_text("")
    code = "import common; common.init_distributed(); print('started')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=script_env() | {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert p.returncode == 0 and "started" in p.stdout, p.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# 8: one run per folder; a torn metrics line; ranks stop with their launcher


def test_8_one_run_per_folder(tmp_path):
    """Two runs into one folder at once both finished, their metrics interleaved. The lock holds the owner's pid;
    a lock whose process is gone (a SIGKILL) is stale and taken over."""
    live = subprocess.Popen(["sleep", "60"])
    try:
        stat = common.launcher._proc_stat(live.pid)
        (tmp_path / common.runs.LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                                        "start": stat[19]}))
        (tmp_path / "args.json").write_text(json.dumps({"_run": {"script": "sft.py"}}))
        before = snapshot(tmp_path)
        with pytest.raises(common.UserError) as e:
            common.runs.start_output_dir(str(tmp_path), sft.Args(), False, True, {"script": "sft.py"})
        one_line_error(e, f"in use by another run (pid {live.pid}")
        assert snapshot(tmp_path) == before
    finally:
        live.kill()
        live.wait()
    common.runs.take_lock(tmp_path)  # the owner is gone: stale, taken over
    assert json.loads((tmp_path / common.runs.LOCK).read_text())["pid"] == os.getpid()
    common.runs.take_lock(tmp_path)  # held by this process now: taken again (prepare_output_dir, start_output_dir)
    common.launcher._release_lock(tmp_path / common.runs.LOCK, os.getpid())
    assert not (tmp_path / common.runs.LOCK).exists()
    (tmp_path / common.runs.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "1"}))
    with pytest.raises(common.UserError) as e:  # another machine's lock cannot be checked: say so
        common.runs.take_lock(tmp_path)
    one_line_error(e, "in use by pid 1 on elsewhere", "if no run is going there, remove that file")


def test_8_a_torn_last_metrics_line_is_dropped_with_a_notice(tmp_path, capsys):
    """A crash mid-write left half a line; --resume then failed with a JSONDecodeError."""
    rows = [json.dumps({"step": i, "train/loss": 1.0}) for i in range(6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "train/lo')
    common.runs.truncate_log(str(tmp_path), 4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert "dropped a line cut short" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n{bad\n" + rows[1] + "\n")
    with pytest.raises(common.UserError) as e:  # not at the end: not a crash, say where
        common.runs.truncate_log(str(tmp_path), 4)
    one_line_error(e, "metrics.jsonl:2: not a JSON line")


def test_8_ranks_stop_when_the_launcher_is_killed(tmp_path):
    """`deepspeed x.py` killed with SIGTERM left its ranks running (its runner does not pass the signal on). Each
    rank watches its launcher (deepspeed's launch.py and the runner above it, or torchrun) and stops when it is
    gone. A real two-rank launch, killed as a user would kill it."""
    script = tmp_path / "rank.py"
    script.write_text(f"import os, sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport common\n"
                      "common.init_distributed()\n"
                      f"open({str(tmp_path)!r} + f'/pid{{common.rank()}}', 'w').write(str(os.getpid()))\n"
                      "time.sleep(300)\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), str(script)]
    runner = subprocess.Popen(cmd, cwd=ROOT, env=script_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 120
    while not all((tmp_path / f"pid{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.2)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=30)
    deadline = time.time() + 30
    while any(common.launcher._alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if common.launcher._alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "ranks outlived their launcher"


# ----------------------------------------------------------------------------------------------------------------
# 9: numbers checked up front; --eval_fraction 0; corrupt checkpoints; a full disk


def numeric_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.name != "local_rank" and
            any(t in str(f.type) for t in ("int", "float"))]


@pytest.mark.parametrize("module", [sft, reward, ppo, chat], ids=lambda m: m.__name__)
def test_9_every_numeric_flag_is_checked_and_its_range_is_in_help(module):
    """Unchecked numbers changed runs silently (--max_seq_len 0 trained on full sequences, --learning_rate 0 used
    the default, --num_epochs 0 saved the untrained model) or ended in tracebacks (zero batch sizes, --ppo_epochs 0,
    --temperature 0 in ppo.py). Every int/float flag has a range, written in its --help, and a value outside it is
    a one-line error naming the flag."""
    source = Path(module.__file__).read_text()
    fields = numeric_fields(module.Args)
    assert all(f.metadata.get("range") for f in fields), [f.name for f in fields if not f.metadata.get("range")]
    for f in fields:
        spec = f.metadata["range"]
        doc = source.split(f"\n    {f.name}: ", 1)[1].split('"""')[1]
        assert spec in " ".join(doc.split()), (f.name, spec, doc)
        for bad in (-10**9, float("nan"), float("inf")):
            if "int" in str(f.type) and isinstance(bad, float):
                continue
            with pytest.raises(common.UserError) as e:
                common.flags.check(module.Args(**{f.name: bad}))
            one_line_error(e, f"--{f.name} {bad}: expected")
        common.flags.check(module.Args())  # the defaults pass


ISSUE_CASES = [
    (sft, {"max_seq_len": 0}, "--max_seq_len 0: expected >= 2"),
    (sft, {"max_seq_len": -5}, "--max_seq_len -5"),
    (sft, {"learning_rate": 0.0}, "--learning_rate 0.0: expected > 0"),
    (sft, {"num_epochs": 0}, "--num_epochs 0"),
    (sft, {"lora_rank": -1}, "--lora_rank -1"),
    (sft, {"eval_every": -1}, "--eval_every -1"),
    (sft, {"per_device_batch_size": 0}, "--per_device_batch_size 0"),
    (reward, {"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps 0"),
    (ppo, {"kl_coef": -1.0}, "--kl_coef -1.0: expected >= 0"),
    (ppo, {"clip_reward_value": -1.0}, "--clip_reward_value -1.0"),
    (ppo, {"ppo_epochs": 0}, "--ppo_epochs 0"),
    (ppo, {"temperature": 0.0}, "--temperature 0.0: expected >= 0.01"),
    (ppo, {"temperature": 1e-300}, "--temperature 1e-300: expected >= 0.01"),  # logits / T overflowed
    (ppo, {"rollout_batch_size": 0}, "--rollout_batch_size 0"),
    (chat, {"temperature": -1.0, "prompt": "hi"}, "--temperature -1.0: expected 0 or >= 0.01"),
    (chat, {"top_p": 2.0, "prompt": "hi"}, "--top_p 2.0: expected 0 < top_p <= 1"),
]


@pytest.mark.parametrize("script, flags, needle", ISSUE_CASES, ids=[n.split(":")[0] for *_, n in ISSUE_CASES])
def test_9_the_cases_of_the_issue_stop_before_anything_runs(script, flags, needle, tmp_path):
    with pytest.raises(common.UserError) as e:
        script.main(script.Args(**flags, **({} if script is chat else {"output_dir": str(tmp_path / "o")})))
    one_line_error(e, needle)
    assert not (tmp_path / "o").exists()


def test_9_eval_fraction_0_means_no_eval(sft_run):
    """sft.py --eval_fraction 0 logged a perfect eval/loss 0 (an empty eval set); now there is no eval row."""
    rows = read_metrics(sft_run[0])
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert not any(k.startswith("eval/") for r in rows for k in r)


def test_9_reward_normalisation_is_never_nan(tiny_models, tmp_path):
    """reward.py --eval_fraction 0 stored NaN reward_mean/reward_std (statistics of an empty set); with one score
    the std was NaN too. Now the training pairs stand in, and one score leaves the scale at 1."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "good answer", "rejected": "bad"}] * 8)
    run_script("reward.py", "--model", tiny_models["llama"], "--data", data, "--eval_fraction", "0", "--max_steps",
               "2", "--per_device_batch_size", "4", "--output_dir", tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert all(isinstance(config[k], float) and config[k] == config[k] for k in ("reward_mean", "reward_std"))
    assert not any(k.startswith("eval/accuracy") for r in read_metrics(tmp_path / "rm") for k in r)

    class OneLogit(torch.nn.Module):  # a classifier whose score head says 3.0 everywhere
        def base_model(self, input_ids, **kwargs):
            return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 1)})()

        def score(self, hidden):
            return torch.full((*hidden.shape[:2], 1), 3.0)

        def train(self, mode=True):
            return self

    stats = reward.normalisation(OneLogit(), [[1, 2, 3]], 4, 0, torch.device("cpu"))
    assert stats == {"eval/reward_mean": 3.0, "eval/reward_std": 1.0}


def test_9_a_corrupt_checkpoint_shard_is_one_line(sft_run, tmp_path):
    """A truncated checkpoint shard ended --resume in a traceback."""
    run = copy_run(sft_run[0], tmp_path)
    shard = next((run / "checkpoints" / "step4").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(run)
    p = run_script("sft.py", *sft_run[1], "--output_dir", run, "--resume", check=False, timeout=300)
    line = one_line_error("\n".join(x for x in p.stderr.splitlines() if x.startswith("error:")),
                          "step4: cannot load this checkpoint", "corrupt")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert line and snapshot(run) == {**before, "args.json.next": snapshot(run)["args.json.next"]}
    assert json.loads((run / "args.json.next").read_text())["resume"] is True  # the checks passed; nothing else
    # changed, args.json included (the resumed run's waits beside it until that run saves something)


def test_9_a_full_disk_is_one_line(tiny_models, tmp_path):
    """A full disk during a save was a traceback. A file-size limit makes every write past 64 kB fail as a full
    disk would (EFBIG instead of ENOSPC): the model save fails, in one line, and leaves no half-written model."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "sft.py"), "--model", tiny_models["gpt2"], "--data", data, "--output_dir", out,
           *SFT_FLAGS[:2], "--max_steps", "1", "--eval_fraction", "0"]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    one_line_error("\n".join(x for x in p.stderr.splitlines() if x.startswith("error:")), "the disk is full")
    assert sorted(f.name for f in out.iterdir()) == ["args.json", "metrics.jsonl"]  # no staging folder, no model
    for e in (OSError(28, "No space left on device", "/x/metrics.jsonl"), RuntimeError("file write failed")):
        err = io.StringIO()
        with redirect_stderr(err):  # ENOSPC itself, and torch.save's report of it
            common.launcher.excepthook(type(e), e, None)
        one_line_error(err.getvalue(), "the disk is full")
    err = io.StringIO()
    with redirect_stderr(err):  # Ctrl-C printed a 20-line traceback
        common.launcher.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert err.getvalue().startswith("interrupted (Ctrl-C)") and err.getvalue().count("\n") == 1
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:15267. This is "
                        "typically caused by a remote worker crashing.")
    err = io.StringIO()
    with redirect_stderr(err):  # rank 0 after rank 1 stopped with its one line: a 20-line traceback
        common.launcher.excepthook(RuntimeError, lost, None)
    one_line_error(err.getvalue(), "another rank stopped (its error is above)")


# ----------------------------------------------------------------------------------------------------------------
# 10: a reward model or critic that is not one


def test_10_a_causal_lm_as_reward_model_is_refused(tiny_models, tmp_path, monkeypatch):
    """ppo.py --reward given a causal LM trained against a random score head, with no warning."""
    tok = common.load_tokenizer(tiny_models["llama"])
    with pytest.raises(common.UserError) as e:
        common.engines.load_value_model(tiny_models["llama"], torch.float32, tok, False, "--reward")
    one_line_error(e, "--reward", "not a sequence classifier", "--new_value_head")
    model = common.engines.load_value_model(tiny_models["llama"], torch.float32, tok, False, "--critic", new_head=True)
    assert model.config.num_labels == 1
    monkeypatch.setattr(common, "init_distributed", lambda: torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"tell me about {t}"} for t in common.toy.TOPICS])
    with pytest.raises(common.UserError) as e:  # main passes the flag name on
        ppo.main(ppo.Args(actor=tiny_models["llama"], reward=tiny_models["llama"], output_dir=str(tmp_path / "o"),
                          data=str(data), max_seq_len=64, max_new_tokens=8, rollout_batch_size=4,
                          per_device_batch_size=4))
    one_line_error(e, "--reward", "not a sequence classifier")
    assert snapshot(tmp_path / "o") == {}  # (its lock is held until this process exits, and the folder removed)


# ----------------------------------------------------------------------------------------------------------------
# 12: chat.py --output and stdin


def test_12_chat_checks_output_before_generating(tmp_path, monkeypatch):
    """--output into a missing folder failed after every answer was generated, and an --output inside the model's
    folder replaced its files (config.json: the model was lost). The model here cannot even load: the check comes
    first."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cases = {str(tmp_path / "missing" / "a.jsonl"): "no such folder", str(tmp_path): "is a folder",
             str(prompts): "would overwrite --prompts", str(model / "config.json"): f"is inside --model {model}",
             str(model / "new.jsonl"): "is inside --model"}  # the model's files were replaced by the answers
    for output, needle in cases.items():
        with pytest.raises(common.UserError) as e:
            chat.main(chat.Args(model=str(model), prompts=str(prompts), output=output))
        one_line_error(e, f"--output {output}", needle)
    # one file of a comma-separated --prompts, and paths given as ~/... (no shell expands a ~ after `=`)
    monkeypatch.setenv("HOME", str(tmp_path))
    other = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "yo"}])
    for spec, output in ((f"{other},{prompts}", str(prompts)), ("~/p.jsonl", "~/p.jsonl")):
        with pytest.raises(common.UserError) as e:
            chat.main(chat.Args(model=str(model), prompts=spec, output=output))
        one_line_error(e, f"--output {output.replace('~', str(tmp_path))}", "would overwrite --prompts")
    assert prompts.read_text() == '{"prompt": "hi"}\n' and (model / "config.json").read_text() == "{}"


def test_a_model_with_damaged_files_is_one_line(tiny_models, tmp_path):
    """A weights file cut short (a failed copy, a full disk) failed deep inside safetensors with a traceback, in every
    script that loads a model; now one line naming the flag and the folder."""
    model = Path(shutil.copytree(tiny_models["gpt2"], tmp_path / "m"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tok = common.load_tokenizer(str(model))
    with pytest.raises(common.UserError) as e:
        common.load_causal_lm(str(model), torch.float32, tok, flag="--actor")
    one_line_error(e, f"--actor {model}: cannot load the model", "are its files complete?")
    with pytest.raises(common.UserError) as e:
        common.engines.load_value_model(str(model), torch.float32, tok, False, "--reward", new_head=True)
    one_line_error(e, f"--reward {model}: cannot load the model")


def test_12_chat_reads_stdin_as_utf8(tiny_models):
    """Invalid UTF-8 on stdin ended the chat with a traceback; now that line is skipped with a message, and the chat
    reads UTF-8 whatever the locale."""
    env = script_env() | {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", tiny_models["gpt2"], "--max_new_tokens",
                        "2", "--greedy"], input=b"\xff\xfe hello\ncaf\xc3\xa9 ?\n/quit\n", cwd=ROOT, env=env,
                       capture_output=True, timeout=300)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "not valid UTF-8" in err and p.stdout.decode().count("bot> ") == 1
    for flag in ("--prompt", "--system"):  # bad bytes in an argument (a surrogate, as Python decodes argv)
        with pytest.raises(common.UserError) as e:
            chat.main(chat.Args(model=tiny_models["gpt2"], **{flag[2:]: "caf\udce9"}))
        one_line_error(e, f"{flag} is not valid UTF-8")


# ----------------------------------------------------------------------------------------------------------------
# 15: no silent wrong run: inputs checked where they enter, every exit honest


def test_15_an_input_replaced_in_place_is_not_the_run_of_the_checkpoint(sft_run, tmp_path, no_models):
    """Inputs were compared by path: a model folder (or data file) replaced in place between a kill and --resume was
    taken without a word. Now args.json holds a fingerprint of each (names, sizes, sampled bytes)."""
    run = copy_run(sft_run[0], tmp_path)
    model = Path(shutil.copytree(sft_run[1][1], tmp_path / "model"))  # same files elsewhere: the same run
    data = Path(shutil.copy(sft_run[1][3], tmp_path / "train.jsonl"))
    for f in run.rglob("args.json"):  # (the run and its checkpoint's copy)
        f.write_text(f.read_text().replace(sft_run[1][1], str(model)).replace(sft_run[1][3], str(data)))
    flags = [str(model) if f == sft_run[1][1] else str(data) if f == sft_run[1][3] else f for f in sft_run[1]]
    with pytest.raises(ModelsWouldLoadNow):
        sft.main(sft_args(flags, output_dir=str(run), resume=True))
    weights = model / "model.safetensors"  # retrained in place: same shapes and size, other numbers
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2 + 7] ^= 0x55
    weights.write_bytes(bytes(raw))
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(flags, output_dir=str(run), resume=True))
    one_line_error(e, f"--model {model} changed since the checkpoint's run read it", "--resume_changes model")
    with pytest.raises(ModelsWouldLoadNow):
        sft.main(sft_args(flags, output_dir=str(run), resume=True, resume_changes=("model",)))
    data.write_text(data.read_text().replace("a", "b", 1))
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(flags, output_dir=str(run), resume=True, resume_changes=("model",)))
    one_line_error(e, f"--data {data} changed")


def test_15_a_checkpoint_carries_the_args_it_was_made_with(sft_run, tmp_path, no_models):
    """A resumed run (here with an accepted new learning rate) killed between its checkpoint and its args.json
    commit left a checkpoint that args.json did not describe; a later --resume with the old flags mixed two runs."""
    run = copy_run(sft_run[0], tmp_path)
    new = sft_args(sft_run[1], output_dir=str(run), resume=True, learning_rate=2e-3, max_steps=8,
                   resume_changes=("learning_rate",))
    common.runs.start_output_dir(str(run), new, False, True, {"script": "sft.py", "total_steps": 8})

    class Engine:  # writes a checkpoint folder as DeepSpeed would
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (Path(folder) / tag).mkdir()

    common.runs.save_checkpoint(Engine(), str(run / "checkpoints"), "step6", {})  # ... and killed here
    assert json.loads((run / "args.json").read_text())["learning_rate"] == 1e-3  # not committed
    assert json.loads((run / "checkpoints" / "step6" / "args.json").read_text())["learning_rate"] == 2e-3
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=8))
    one_line_error(e, "learning_rate 0.002 -> 0.001")


def test_15_resume_of_a_finished_run_says_finished(sft_run, tmp_path, no_models):
    """--resume of a finished run re-trained the steps after its last checkpoint (4 of 6) and replaced its model."""
    run = copy_run(sft_run[0], tmp_path, finished=True)
    before = snapshot(run)
    with pytest.raises(common.UserError) as e:
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True))
    one_line_error(e, "the run finished (total_steps 6", "a longer run continues from its checkpoint step4")
    with pytest.raises(ModelsWouldLoadNow):  # a longer run continues
        sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True, max_steps=9))
    assert snapshot(run) == before


def test_15_the_folder_lock_is_taken_before_any_model_loads(sft_run, tmp_path, no_models):
    """A second run into a busy folder was refused only after loading its models (29 s on the toy); a refused run
    left the folder it had made."""
    run = copy_run(sft_run[0], tmp_path)
    live = subprocess.Popen(["sleep", "60"])
    try:
        (run / common.runs.LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                                        "start": common.launcher._proc_stat(live.pid)[19]}))
        with pytest.raises(common.UserError) as e:  # not ModelsWouldLoadNow
            sft.main(sft_args(sft_run[1], output_dir=str(run), resume=True))
        one_line_error(e, f"in use by another run (pid {live.pid}")
    finally:
        live.kill()
        live.wait()
    p = run_script("sft.py", "--model", sft_run[1][1], "--data", tmp_path / "missing.jsonl", "--output_dir",
                   tmp_path / "new", check=False)
    assert "no such data file" in p.stderr and not (tmp_path / "new").exists(), p.stderr[-2000:]  # made, locked,
    # refused after the lock, removed


def test_15_every_logged_value_is_checked_as_it_is_made(tmp_path):
    """One pair with `margin: 1e308` made the step-0 evaluation log `Infinity` (not JSON) and the run trained on
    until its final save refused. Such a margin is refused at load (test_data.py); any value logged, the first one
    included, stops the run naming it, and no row is written."""
    logger = common.Logger(str(tmp_path), 2, "test")
    logger.log(0, {"eval/loss": 1.0, "n": 3})
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(common.UserError) as e:
            logger.log(0, {"eval/loss": bad})
        one_line_error(e, "step 0: eval/loss is")
    logger.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 0, "eval/loss": 1.0, "n": 3}]


def test_15_chat_output_writes_into_what_it_names(tiny_models, tmp_path):
    """--output renamed a temporary file over the path: /dev/stdout, a FIFO or a device became a regular file (as
    root, a system device), and a link to a file was replaced by a file. Now those are written into, and a link's
    target is written."""
    flags = ["--model", tiny_models["gpt2"], "--prompt", "hi", "--max_new_tokens", "2", "--greedy"]
    stdout = tmp_path / "stdout"  # a link to /dev/stdout: what broken code would replace is this link, not the device
    stdout.symlink_to("/dev/stdout")
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), *flags, "--output", str(stdout)], cwd=ROOT,
                       env=script_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["prompt"] == "hi", p.stderr[-2000:]
    assert stdout.is_symlink()
    fifo, link, target = tmp_path / "fifo", tmp_path / "link.jsonl", tmp_path / "target.jsonl"
    os.mkfifo(fifo)
    link.symlink_to(target.name)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    run_script("chat.py", *flags, "--output", fifo)
    assert json.loads(reader.communicate(timeout=60)[0])["prompt"] == "hi"
    run_script("chat.py", *flags, "--output", link)
    assert fifo.is_fifo() and link.is_symlink() and json.loads(target.read_text())["prompt"] == "hi"


@pytest.mark.parametrize("case", ["no tokenizer files", "unknown model_type", "vocab_size not the weights'"])
def test_15_a_model_folder_that_does_not_fit_is_one_line(tiny_models, tmp_path, case):
    """A folder without tokenizer files trained with an empty tokenizer that transformers made up (loss 0, exit 0);
    an unknown model_type and a config whose vocab_size disagreed with the weights were tracebacks."""
    model = Path(shutil.copytree(tiny_models["gpt2"], tmp_path / "m"))
    config = json.loads((model / "config.json").read_text())
    if case == "no tokenizer files":
        for f in model.iterdir():
            if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
                f.unlink()
        needle = "the folder has no tokenizer files"
    elif case == "unknown model_type":
        config["model_type"] = "gpt9"
        needle = "model type `gpt9`"
    else:
        config["vocab_size"] += 7
        needle = f"is [{config['vocab_size'] - 7}, {config['n_embd']}] in its files but [{config['vocab_size']}"
    (model / "config.json").write_text(json.dumps(config))
    p = run_script("sft.py", "--model", model, "--data", "toy", "--max_steps", "1", "--output_dir", tmp_path / "o",
                   check=False)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-3000:]
    assert not (tmp_path / "o").exists()
