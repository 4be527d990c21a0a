"""Runs that survive: exact resume, crash-safe checkpoints, skipped non-finite updates, rewards
that fail."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import common
import data
import inputs
import model as modellib
import rewards
import sampler
import sources
import train
from conftest import REPO
from helpers import SMALL, metrics, run, run_fail


@pytest.mark.parametrize("switches", [
    [], ["--ref_sync_every", "2"], ["--lora_rank", "4"],
    ["--importance_sampling_level", "sequence", "--entropy_coef", "0.01", "--top_entropy_quantile",
     "0.5", "--scale_rewards", "gdpo", "--overlong_buffer", "4", "--kl_estimator", "k1"]],
    ids=["frozen-ref", "refreshed-ref", "lora", "gspo-and-friends"])
def test_a_resumed_run_equals_one_trained_straight(tiny_path, tmp_path, switches):
    args = ["train.py", "--steps", "6", "--save_every", "3", *SMALL, *switches]
    run([*args, "--output_dir", str(tmp_path / "straight")])
    # The second half alone, from the straight run's step-3 checkpoint, on the same one rank:
    # bit-exact.
    out = run([*args, "--output_dir", str(tmp_path / "resumed"),
               "--resume", str(tmp_path / "straight" / "step-3")])
    assert "resumed from" in out and "not bit-exact" not in out
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    second_half = metrics(tmp_path / "straight")[3:]
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [4, 5, 6]
    for a, b in zip(second_half, metrics(tmp_path / "resumed")):
        assert ((a["reward"], a["completion_len"], a["letter_A"])
                == (b["reward"], b["completion_len"], b["letter_A"]))


def test_resume_auto_takes_the_newest_checkpoint(tiny_path, tmp_path):
    """Of those kept (the newest 2 of 3), and on another rank count it says it is not bit-exact."""
    args = ["train.py", "--steps", "4", "--save_every", "1", "--keep_checkpoints", "2", *SMALL,
            "--output_dir", str(tmp_path)]
    run(args)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-3"]
    (tmp_path / "metrics.jsonl").unlink()
    out = run([*args, "--resume", "auto"], nproc=2)
    assert "resumed from" in out and "step-3" in out and "not bit-exact" in out
    assert [m["step"] for m in metrics(tmp_path)] == [4]


def test_a_failed_save_leaves_the_last_checkpoint_whole(tiny, tmp_path, single_process_group,
                                                        monkeypatch):
    model, processor = tiny
    modellib.shard(model, bf16=False)
    checkpoint.save(model, processor, tmp_path / "final", {"train_config.json": {"version": 1}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(inputs.Processor, "save_pretrained", die)
    with pytest.raises(SystemExit, match="saving .*final failed: disk full .*GiB free.* untouched"):
        checkpoint.save(model, processor, tmp_path / "final", {"train_config.json": {"version": 2}})
    assert not (tmp_path / "final.tmp").exists()
    assert json.loads((tmp_path / "final" / "train_config.json").read_text()) == {"version": 1}
    reloaded = modellib.load_model(tmp_path / "final")
    before = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in reloaded.state_dict().items() if n in before)


def test_trainer_state_loads_without_unpickling_objects(tiny_path, tmp_path):
    run(["train.py", "--steps", "2", "--save_every", "1", *SMALL, "--output_dir", str(tmp_path)])
    state = torch.load(tmp_path / "step-1" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and "optimizer" in state and state["world"] == 1


def test_a_non_finite_loss_skips_only_its_update(tiny_path, tmp_path, monkeypatch):
    import grpo

    calls = {"n": 0}
    real = grpo.policy_loss

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss, metrics_ = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics_

    monkeypatch.setattr(grpo, "policy_loss", nan_on_second_call)
    monkeypatch.setattr("sys.argv", ["train.py", "--steps", "3", "--save_every", "0", *SMALL,
                                     "--output_dir", str(tmp_path)])
    train.main()
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert [torch.tensor(m["grad_norm"]).isfinite().item() for m in logged] == [True, False, True]


def test_several_non_finite_updates_in_a_row_stop_the_run(tiny_path, tmp_path, monkeypatch):
    import grpo

    real = grpo.policy_loss

    def nan_loss(*args, **kwargs):
        """The real loss and metrics, with the loss made NaN: every update is skipped."""
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    monkeypatch.setattr(train, "MAX_SKIPPED_STEPS", 2)
    monkeypatch.setattr("sys.argv", ["train.py", "--steps", "5", "--save_every", "0",
                                     *SMALL, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="2 non-finite updates in a row at step 2"):
        train.main()
    torch.distributed.destroy_process_group()


def test_a_failing_reward_is_named_with_its_sample(monkeypatch):
    def broken(completion, sample):
        raise KeyError("gold")

    monkeypatch.setitem(rewards.REWARDS, "broken", broken)
    with pytest.raises(RuntimeError, match="reward 'broken' failed on sample 'q-7'"):
        rewards.score(["<answer>A</answer>"], [{"id": "q-7", "options": {"A": "x"}, "answer": "A"}],
                      ["broken"], "no-think")


def test_a_prompt_over_the_limit_is_refused(tiny, modality_split):
    model, processor = tiny
    sample = modality_split[0][0]
    real_length = data.collate([sample], processor, "think-after").input_ids.shape[1]
    data.check_prompts([sample], processor, "think-after", 384, 0, real_length + 8, 8)
    message = f"longer than .*record {sample['id']!r} with {real_length} tokens"
    with pytest.raises(data.DataError, match=message):
        data.check_prompts([sample], processor, "think-after", 384, 0, real_length + 7, 8)


def test_prompts_past_the_models_positions_stop_both_scripts(tiny_path, tmp_path):
    """The tiny model has 4096 positions: 4090 new tokens leave too few for any prompt."""
    for args in (["train.py", "--output_dir", str(tmp_path)],
                 ["eval.py", "--checkpoints", str(tiny_path)]):
        stopped = subprocess.run([sys.executable, *args, "--max_new_tokens", "4090"], cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert stopped.returncode != 0
        message = "longer than the model's 4096 positions less --max_new_tokens (6 tokens)"
        assert message in stopped.stderr


def test_a_cut_jpeg_stops_both_ranks_before_training(tiny_path, tmp_path):
    """Its header is fine, so only decoding finds it: the rank that decodes it tells the other,
    and both stop with the message before any step (rank 0 must not wait forever)."""
    images = tmp_path / "Images" / "X"
    images.mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (56, 56), (200, 20, 20)).save(images / f"{name}.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "cut.jpg")
    # Cut in the pixel data.
    (images / "cut.jpg").write_bytes((images / "cut.jpg").read_bytes()[:1500])

    def split(names):
        return [{"image": f"Images/X/{n}", "problem": "Which modality? A)CT, B)MRI",
                 "solution": "<answer> A </answer>"} for n in names]

    train_split = tmp_path / "CT(Computed Tomography)_train.json"
    test_split = tmp_path / "CT(Computed Tomography)_test.json"
    train_split.write_text(json.dumps(split(["a.png", "cut.jpg"])))
    test_split.write_text(json.dumps(split(["b.png", "c.png"])))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train.py", "--data", str(tmp_path), "--train_split", str(train_split),
         "--test_split", str(test_split), "--steps", "2", "--prompts_per_step", "2",
         "--num_generations", "2", "--eval_every", "0", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "record 'CT(Computed Tomography)_train#1': image" in done.stdout + done.stderr
    assert "cut.jpg: image file is truncated" in done.stdout + done.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_nan_weights_stop_sampling_with_a_clear_error(tiny, modality_split):
    model, processor = tiny
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    prompts = data.collate(modality_split[0][:2], processor, "think-after")
    for temperature in (1.0, 0.0):
        with pytest.raises(FloatingPointError, match="NaN or infinite at completion token 0"):
            sampler.sample(model, prompts, 2, sampler.Decoding(4, temperature),
                           generator=torch.Generator().manual_seed(0))
    with pytest.raises(SystemExit, match="step 7: the model's logits are NaN"):
        with common.named_step(7):
            sampler.sample(model, prompts, 2, sampler.Decoding(4), generator=torch.Generator())


def test_a_used_folder_needs_resume_or_overwrite(tiny_path, tmp_path):
    args = ["train.py", "--steps", "2", "--save_every", "1", *SMALL, "--output_dir", str(tmp_path)]
    run(args)
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0 and f"--output_dir {tmp_path} holds a run" in done.stderr
    assert "--overwrite true" in done.stderr and [m["step"] for m in metrics(tmp_path)] == [1, 2]
    run([*args, "--overwrite", "true"])
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]  # the old run's lines are gone


def test_a_live_run_keeps_its_folder_until_killed(tiny_path, tmp_path):
    args = ["train.py", *SMALL, "--save_every", "1", "--output_dir", str(tmp_path / "run")]
    live = subprocess.Popen([sys.executable, *args, "--steps", "10000"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        for extra in ([], ["--resume", "auto"], ["--overwrite", "true"]):
            stopped = run_fail([*args, "--steps", "3", *extra])
            assert f"--output_dir {tmp_path / 'run'}: another run is writing there now" in stopped
    finally:
        live.kill()  # SIGKILL: no cleanup, the kernel drops the lock
        live.wait()
    assert "resumed from" in run([*args, "--steps", "3", "--resume", "auto"])


def test_a_file_is_no_output_folder(tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        stopped = run_fail(["train.py", "--output_dir", str(out)])
        assert f"--output_dir {out}: cannot write there" in stopped


def test_resume_auto_survives_a_crash_mid_save(tiny_path, tmp_path):
    args = ["train.py", "--steps", "4", "--save_every", "1", "--keep_checkpoints", "3", *SMALL,
            "--output_dir", str(tmp_path)]
    run(args)
    state = tmp_path / "step-3" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])  # a disk that filled up
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # a line the crash cut short
    out = run([*args, "--resume", "auto"])
    assert f"not resuming from {tmp_path / 'step-3'}: trainer_state.pt is cut short" in out
    assert f"resumed from {tmp_path / 'step-2'} at step 2" in out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_checkpoint_with_weights_cut_short_is_incomplete(tiny_path, tmp_path):
    folder = tmp_path / "step-5"
    shutil.copytree(tiny_path, folder)
    torch.save({"step": 5}, folder / "trainer_state.pt")
    assert checkpoint.incomplete(folder) == ""
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert checkpoint.incomplete(folder) == "model.safetensors is cut short"
    (folder / "trainer_state.pt").unlink()
    with pytest.raises(SystemExit, match="no trainer_state.pt"):
        checkpoint.resume_folder(str(folder), tmp_path)


def test_two_concurrent_builds_both_get_the_default(dataset_root, tmp_path):
    """Two runs started together on an empty cache: each builds in a folder of its own."""
    script = ("import sys, tiny; "
              "root = tiny.make_synthetic(sys.argv[1] + '/data', images_per_modality=4); "
              "tiny.build_tiny(sys.argv[1] + '/model', root, warmup_steps=1); print('built')")
    builds = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [build.communicate(timeout=600) for build in builds]
    assert [build.returncode for build in builds] == [0, 0], outputs
    # No build folder left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model"]
    assert len(sources.load_omnimedvqa(tmp_path / "data")) > 0
    assert modellib.load_model(tmp_path / "model") is not None


def test_rank_0_builds_the_default_while_rank_1_waits(dataset_root, tmp_path):
    """As on a fresh machine: the build runs on rank 0 alone, so it must make no collective
    call (one would wait forever for the other rank, held at the barrier)."""
    script = tmp_path / "build.py"
    script.write_text(
        "import sys, functools, torch.distributed as dist, tiny\n"
        "dist.init_process_group('gloo')\n"
        "tiny.build_tiny = functools.partial(tiny.build_tiny, warmup_steps=1)\n"
        "print('built', tiny.model_path('', sys.argv[1], sys.argv[2]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path), str(dataset_root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("built") == 2, done.stderr[-2000:]


def test_a_resume_says_how_it_differs_from_its_run(tiny_path, tmp_path):
    """Other questions, or a folder that holds later checkpoints, stop it; changed settings are
    listed."""
    args = ["train.py", "--steps", "3", "--save_every", "1", *SMALL]
    run([*args, "--output_dir", str(tmp_path / "first")])
    resume = ["--resume", str(tmp_path / "first" / "step-1")]
    done = subprocess.run([sys.executable, *args, *resume, "--modalities", "CT", "--output_dir",
                           str(tmp_path / "ct")], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0 and "it trained on other questions than these" in done.stderr
    # Into its own folder, which holds step-2 of the run it leaves behind.
    done = subprocess.run([sys.executable, *args, *resume, "--output_dir", str(tmp_path / "first")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "also holds the later checkpoints step-2;" in done.stderr
    out = run([*args, *resume, "--lr", "0.0002", "--steps", "2",
               "--output_dir", str(tmp_path / "lr")])
    # --steps sets the learning-rate schedule's length: a change is a change of what is trained.
    assert "resuming with changed settings: " in out
    assert "lr 0.0005 -> 0.0002" in out and "steps 3 -> 2" in out
