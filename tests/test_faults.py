"""Runs that survive: exact resume, crash-safe checkpoints, skipped non-finite updates, rewards that fail."""

import json

import pytest
import torch
from safetensors.torch import load_file

import model as modellib
import rewards
import train
from test_train import SMALL, metrics, run


def test_resume_gives_the_same_weights_and_completions_as_training_straight(tiny_path, tmp_path):
    args = ["train.py", "--steps", "6", "--save_every", "3", *SMALL]
    run([*args, "--output_dir", str(tmp_path / "straight")])
    # The second half alone, from the straight run's step-3 checkpoint, on the same one rank: bit-exact.
    out = run([*args, "--output_dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "straight" / "step-3")])
    assert "resumed from" in out and "not bit-exact" not in out
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    second_half = metrics(tmp_path / "straight")[3:]
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [4, 5, 6]
    for a, b in zip(second_half, metrics(tmp_path / "resumed")):
        assert (a["reward"], a["completion_len"], a["letter_A"]) == (b["reward"], b["completion_len"], b["letter_A"])


def test_resume_auto_takes_the_newest_checkpoint_and_another_rank_count_says_so(tiny_path, tmp_path):
    args = ["train.py", "--steps", "4", "--save_every", "1", "--keep_checkpoints", "2", *SMALL,
            "--output_dir", str(tmp_path)]
    run(args)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-3"]  # the newest 2 of 3
    (tmp_path / "metrics.jsonl").unlink()
    out = run([*args, "--resume", "auto"], nproc=2)
    assert "resumed from" in out and "step-3" in out and "not bit-exact" in out
    assert [m["step"] for m in metrics(tmp_path)] == [4]


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_loadable(tiny, tmp_path, single_process_group,
                                                                          monkeypatch):
    model, processor = tiny
    modellib.shard(model, bf16=False)
    modellib.save_checkpoint(model, processor, tmp_path / "final", {"train_config.json": {"version": 1}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modellib.Processor, "save_pretrained", die)
    with pytest.raises(OSError, match="disk full"):
        modellib.save_checkpoint(model, processor, tmp_path / "final", {"train_config.json": {"version": 2}})
    assert json.loads((tmp_path / "final" / "train_config.json").read_text()) == {"version": 1}
    reloaded = modellib.load_model(tmp_path / "final")
    before = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in reloaded.state_dict().items() if n in before)


def test_trainer_state_loads_without_unpickling_objects(tiny_path, tmp_path):
    run(["train.py", "--steps", "2", "--save_every", "1", *SMALL, "--output_dir", str(tmp_path)])
    state = torch.load(tmp_path / "step-1" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and "optimizer" in state and state["world"] == 1


def test_a_non_finite_loss_skips_one_update_and_training_goes_on(tiny_path, tmp_path, monkeypatch):
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
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (lambda l, m: (l * float("nan"), m))(*real(*a, **k)))
    monkeypatch.setattr("sys.argv", ["train.py", "--steps", "5", "--max_skipped_steps", "2", "--save_every", "0",
                                     *SMALL, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="2 non-finite updates in a row at step 2"):
        train.main()
    torch.distributed.destroy_process_group()


def test_a_reward_that_raises_names_itself_and_the_sample(monkeypatch):
    def broken(completion, sample):
        raise KeyError("gold")

    monkeypatch.setitem(rewards.REWARDS, "broken", broken)
    with pytest.raises(RuntimeError, match="reward 'broken' failed on sample 'q-7'"):
        train.score(["<answer>A</answer>"], [{"id": "q-7", "options": {"A": "x"}, "answer": "A"}], ["broken"])
