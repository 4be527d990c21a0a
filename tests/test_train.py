"""The training and evaluation scripts end to end: one process against two, and learning at all."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import eval as evaluation
import grpo
import inputs
import model as modellib
import sampler
import train
from conftest import REPO
from helpers import SMALL, metrics, run

SWITCHES = ["--loss_type", "dapo", "--scale_rewards", "batch", "--num_iterations", "2",
            "--minibatches", "2", "--filter_zero_std", "true", "--mask_truncated", "true",
            "--ref_sync_every", "2", "--grad_checkpointing", "true"]
# The 2026 switches (grpo.py's equations (1), (2), (4), (5) and (9)) on two minibatches.
SWITCHES_2026 = ["--importance_sampling_level", "sequence", "--eps_low", "3e-4", "--eps_high",
                 "4e-4", "--kl_estimator", "k2", "--entropy_coef", "0.01",
                 "--top_entropy_quantile", "0.5", "--scale_rewards", "gdpo", "--reward_weights",
                 "0.5,2", "--overlong_buffer", "4", "--minibatches", "2", "--num_iterations", "2"]


@pytest.mark.parametrize("switches", [[], SWITCHES, SWITCHES_2026,
                                      ["--lora_rank", "4", "--num_iterations", "2"]],
                         ids=["medr1", "dapo-and-friends", "gspo-and-friends", "lora"])
def test_two_processes_train_like_one(tiny_path, tmp_path, switches):
    """Same prompts, same samples, same losses and weights: FSDP2 over gloo changes nothing."""
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into steps of up to
    # lr size, so a smaller lr keeps that noise under 1e-5 while a real difference
    # in the gradients (a wrong image, a group split over ranks) still shows.
    for nproc in (1, 2):
        run(["train.py", "--steps", "3", "--lr", "1e-4", "--output_dir",
             str(tmp_path / f"ranks{nproc}"), *SMALL, *switches], nproc)
    one, two = metrics(tmp_path / "ranks1"), metrics(tmp_path / "ranks2")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    weights_one = load_file(tmp_path / "ranks1" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "ranks2" / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5)
    # The updates really moved the weights, by far more than the tolerance.
    base = load_file(tiny_path / "model.safetensors")
    assert max((base[name] - weights_one[name]).abs().max().item() for name in base) > 1e-4


def test_eval_results_ignore_ranks_batches_decoders(tiny_path, tmp_path):
    results = []
    for nproc, batch_size, decoder in [(1, 64, "dynamic"), (2, 8, "dynamic"), (2, 3, "static")]:
        run(["eval.py", "--checkpoints", str(tiny_path), "--max_samples", "5", "--batch_size",
             str(batch_size), "--decoder", decoder, "--output", str(tmp_path)], nproc)
        results.append(json.loads((tmp_path / "eval_results.json").read_text())["tiny-qwen2-vl"])
    assert results[0]["overall"]["questions"] == 8 * 5
    assert results[0] == results[1] == results[2]
    # matplotlib is in requirements.txt: the heatmap is drawn.
    with Image.open(tmp_path / "accuracy.png") as heatmap:
        assert heatmap.size[0] > 100


def test_a_few_dozen_grpo_steps_raise_the_reward(tiny_path, tmp_path):
    """On CT questions alone the right letter is always A: the base picks it a quarter of the
    time."""
    run(["train.py", "--steps", "30", "--modalities", "CT", "--output_dir", str(tmp_path),
         "--eval_every", "0", "--eval_size", "8"])
    accuracy = [m["reward_accuracy"] for m in metrics(tmp_path)]
    base, last = accuracy[0], sum(accuracy[-5:]) / 5  # step 1's completions come from the base
    # At least half the way from the base to perfect.
    assert last > base + 0.5 * (1 - base), (base, last)
    with Image.open(tmp_path / "curves.png") as curves:
        assert curves.size[0] > 100


def test_an_unknown_flag_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(train.Config, ["--lr_rate", "1"])
    error = capsys.readouterr().err
    assert "unrecognized arguments: --lr_rate" in error and "[--lr float]" in error


def test_flag_with_a_bad_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(train.Config, ["--steps", "ten"])
    assert "argument --steps: invalid int value: 'ten'" in capsys.readouterr().err


def test_flags_take_either_form(capsys):
    cfg = common.parse_args(train.Config, ["--lr=1e-4", "--steps", "7", "--mask_truncated", "yes"])
    assert (cfg.lr, cfg.steps, cfg.mask_truncated) == (1e-4, 7, True)
    with pytest.raises(SystemExit):
        common.parse_args(train.Config, ["--mask_truncated", "maybe"])
    assert "want true or false, got 'maybe'" in capsys.readouterr().err


def test_help_shows_each_fields_comment(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(train.Config, ["--help"])
    assert "mu: policy updates per rollout" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("steps", 0, "at least 1"), ("steps", -3, "at least 1"), ("max_new_tokens", 0, "at least 1"),
    ("num_iterations", 0, "at least 1"), ("minibatches", 0, "at least 1"),
    ("temperature", 0.0, "above 0"), ("temperature", -1.0, "above 0"),
    ("top_p", 0.0, "in \\(0, 1\\]"), ("top_k", -1, "at least 0"), ("beta", -1.0, "at least 0"),
    ("eps_low", 2.0, "in \\[0, 1\\)"), ("grad_clip", 0.0, "above 0"),
    ("save_every", -1, "at least 0"), ("eval_every", -1, "at least 0"),
    ("keep_checkpoints", 0, "at least 1"), ("dtype", "fp16", "one of"),
    ("loss_type", "ppo", "one of"),
    ("prompt_mode", "zero-shot", "one of"), ("rewards", "format,format", "distinct"),
    ("rewards", "format,acuracy", "names from"), ("modalities", "CT,MRl", "names from"),
    ("modalities", "CT, MRI", "no spaces"), ("question_types", "Diagnosis", "names from"),
    ("ref_sync_alpha", 0.0, "in \\(0, 1\\]"), ("ref_sync_every", -2, "at least 0"),
    ("reward_weights", "1,x", "comma-separated numbers"), ("reward_weights", "1,nan", "numbers"),
    ("top_entropy_quantile", 0.0, "in \\(0, 1\\]"), ("entropy_coef", -0.1, "at least 0"),
    ("kl_estimator", "k4", "one of"), ("importance_sampling_level", "seq", "one of"),
    ("scale_rewards", "gpdo", "one of"), ("overlong_buffer", -1, "at least 0"),
])
def test_a_flag_out_of_range_is_refused_by_name(flag, value, message):
    with pytest.raises(SystemExit, match=f"--{flag} {value!r}: must be .*{message}"):
        train.resolve(train.Config(**{flag: value}), world=1)


@pytest.mark.parametrize("changes, message", [
    ({"reward_weights": "1,2,3"}, "one weight per reward in --rewards format,accuracy"),
    ({"overlong_buffer": 32}, "--overlong_buffer 32 must be below --max_new_tokens"),
])
def test_switches_that_disagree_with_another_flag_are_refused(changes, message):
    with pytest.raises(SystemExit, match=message):
        train.resolve(train.Config(**changes), world=1)


def test_reference_refresh_without_a_reference_is_refused():
    with pytest.raises(SystemExit, match="--ref_sync_every needs a reference"):
        train.resolve(train.Config(beta=0.0, ref_sync_every=5), world=1)


def test_eval_refuses_a_bad_flag_up_front():
    for changes, message in [({"columns": "bogus"}, "--columns 'bogus'"),
                             ({"max_samples": -1}, "--max_samples -1"),
                             ({"batch_size": 0}, "--batch_size 0")]:
        with pytest.raises(SystemExit, match=message):
            evaluation.resolve(evaluation.EvalConfig(**changes))


def test_eval_refuses_a_missing_checkpoint_up_front(tiny_path, tmp_path):
    config = evaluation.EvalConfig(checkpoints=f"{tiny_path},{tmp_path / 'nope'}")
    with pytest.raises(SystemExit, match="nope' is not a model or adapter folder"):
        evaluation.resolve(config)


def test_prompts_must_split_evenly_over_ranks():
    with pytest.raises(SystemExit, match="multiple of the 3 ranks"):
        train.resolve(train.Config(prompts_per_step=4), world=3)


# ---- the GRPO switches, on the real update step with the tiny model


@pytest.fixture
def step_inputs(tiny, modality_split, single_process_group):
    """A sharded tiny policy, its optimizer, 2 prompts and a G=4 rollout of them."""
    model, processor = tiny
    modellib.shard(model, bf16=False)
    # Before any forward, as in train.py: after one without gradients, model.parameters()
    # holds the root unit's gathered parameters instead of FSDP's shards.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    samples = modality_split[0][:2]
    prompts = data.collate(samples, processor, "think-after")
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, prompts, 4, sampler.Decoding(12, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    return model, optimizer, schedule, prompts, samples, rollout


def grpo_step(step_inputs, rewards_by_row, **config):
    model, optimizer, schedule, prompts, samples, rollout = step_inputs
    cfg = train.Config(num_generations=4, beta=0.0, **config)
    reward_table = torch.tensor(rewards_by_row, dtype=torch.float32).unsqueeze(1)  # (8, 1)
    metrics = train.update_policy(cfg, model, None, optimizer, schedule, prompts, rollout,
                                  reward_table)
    return common.reduce_over_ranks(metrics)


def test_zero_std_filter_skips_flat_groups(step_inputs, monkeypatch):
    """Flat groups are counted either way; with the filter their rows get no forward."""
    rows_computed = []
    real = modellib.token_logprobs

    def counted_token_logprobs(model, prompts, ids, *args, **kw):
        rows_computed.append(len(ids))
        return real(model, prompts, ids, *args, **kw)

    monkeypatch.setattr(modellib, "token_logprobs", counted_token_logprobs)
    # Group 0 (rows 0-3) is all equal; group 1 has a spread.
    metrics = grpo_step(step_inputs, [1, 1, 1, 1, 0, 1, 0, 1], filter_zero_std=True)
    assert metrics["zero_std_groups"] == 0.5 and metrics["trained_rows"] == 0.5
    assert rows_computed == [4]
    rows_computed.clear()
    metrics = grpo_step(step_inputs, [1, 1, 1, 1, 0, 1, 0, 1])
    assert metrics["zero_std_groups"] == 0.5 and rows_computed == [8]


def test_ratio_leaves_one_only_on_later_updates(step_inputs):
    on_policy = grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1])
    assert on_policy["ratio_min"] == on_policy["ratio_max"] == 1.0
    assert on_policy["clip_frac"] == 0
    # Two passes over two minibatches: every update after the first sees a moved policy.
    several = grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1], num_iterations=2, minibatches=2,
                        eps_low=0.001, eps_high=0.001)
    assert several["ratio_max"] > 1.001 or several["ratio_min"] < 0.999
    assert several["clip_frac"] > 0


def gradients(model, params, prompts, rollout) -> list[torch.Tensor]:
    """The gradients of params (the optimizer's: FSDP2's shards) of one backward pass of the
    summed log-probs, zeroed between forward and backward as train.optimizer_step does."""
    loss = modellib.token_logprobs(model, prompts, rollout.completion_ids, rollout.completion_mask,
                                   group_size=4).sum()
    for p in params:
        p.grad = None
    loss.backward()
    return [getattr(p.grad, "_local_tensor", p.grad).clone() for p in params]


def test_each_backward_gives_a_plain_models_gradients(step_inputs, tiny_path):
    """Oracle: the model without FSDP2, after the rollout's forwards without gradients."""
    sharded, optimizer, _, prompts, _, rollout = step_inputs
    plain = modellib.load_model(tiny_path)
    expected = gradients(plain, list(plain.parameters()), prompts, rollout)
    for _ in range(2):
        computed = gradients(sharded, optimizer.param_groups[0]["params"], prompts, rollout)
        for ours, theirs in zip(computed, expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_an_update_of_no_rows_leaves_the_weights(step_inputs):
    """AdamW would move the weights by its momentum even on a zero gradient."""
    model = step_inputs[0]
    grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1])  # the optimizer now has momentum
    before = [p.detach().to_local().clone() for p in model.parameters()]
    metrics = grpo_step(step_inputs, [1] * 8, filter_zero_std=True)
    assert metrics["trained_rows"] == 0 and metrics["grad_norm"] == 0
    assert all(torch.equal(p.detach().to_local(), b) for p, b in zip(model.parameters(), before))


def test_an_update_without_tokens_counts_for_nothing(single_process_group):
    """Updates weigh by their tokens; one a rank runs without rows (0 tokens) counts for nothing,
    and where no update has tokens the extremes are not logged."""
    trained = {"loss": 0.5, "grad_norm": 2.0, "kl": 0.3, "clip_frac": 0.25, "kl_max": 0.9,
               "ratio_min": 0.8, "ratio_max": 1.3}
    less = {"loss": 0.1, "grad_norm": 1.0, "kl": 0.1, "clip_frac": 0.0, "kl_max": 0.2,
            "ratio_min": 0.95, "ratio_max": 1.05}
    empty = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip_frac": 0.0, "kl_max": 0.0,
             "ratio_min": 1.0, "ratio_max": 1.0}
    sums = common.update_sums([(trained, 30), (less, 10), (empty, 0)])
    assert common.reduce_over_ranks(sums) == pytest.approx(
        {"loss": 0.2, "grad_norm": 1.0, "kl": 0.25, "clip_frac": 0.1875, "kl_max": 0.9,
         "ratio_min": 0.8, "ratio_max": 1.3})
    nothing = common.reduce_over_ranks(common.update_sums([(empty, 0)]))
    assert nothing == {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip_frac": 0.0}


def test_mask_truncated_gives_cut_rows_no_loss(step_inputs, monkeypatch):
    rollout = step_inputs[-1]
    rollout.truncated[:] = torch.tensor([True, False] * 4)
    masks = []
    real = grpo.policy_loss

    def policy_loss_noting_the_mask(logprobs, old, ref, advantages, mask, **kw):
        masks.append(mask)
        return real(logprobs, old, ref, advantages, mask, **kw)

    monkeypatch.setattr(grpo, "policy_loss", policy_loss_noting_the_mask)
    grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1], mask_truncated=True)
    assert masks[0][0::2].sum() == 0 and (masks[0][1::2].sum(dim=1) > 0).all()


def bf16_models(tiny_path):
    """The policy and reference train.py loads for --dtype bf16."""
    return modellib.load_models(train.Config(dtype="bf16"), str(tiny_path), torch.device("cpu"))


def test_bf16_training_keeps_the_reference_in_bf16(tiny_path, single_process_group):
    policy, reference = bf16_models(tiny_path)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights
    assert all(p.dtype == torch.bfloat16 for p in reference.parameters())


def test_a_bf16_reference_syncs_toward_the_policy(tiny_path, single_process_group):
    policy, reference = bf16_models(tiny_path)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.5)
    before = [p.full_tensor().float() for p in reference.parameters()]
    modellib.sync_reference(policy, reference, 0.25)
    for ref, old, param in zip(reference.parameters(), before, policy.parameters()):
        expected = 0.25 * param.full_tensor() + 0.75 * old
        torch.testing.assert_close(ref.full_tensor().float(), expected, rtol=1e-2, atol=1e-2)


def test_beta_zero_loads_no_reference_model(tiny_path, monkeypatch, single_process_group):
    loaded = []
    real = modellib.load_model

    def counted_load_model(path, *dtype):
        loaded.append(path)
        return real(path, *dtype)

    monkeypatch.setattr(modellib, "load_model", counted_load_model)
    cpu = torch.device("cpu")
    policy, reference = modellib.load_models(train.Config(beta=0.0), str(tiny_path), cpu)
    assert reference is None and len(loaded) == 1
    policy, reference = modellib.load_models(train.Config(beta=0.04), str(tiny_path), cpu)
    assert reference is not None and len(loaded) == 3
    assert not any(p.requires_grad for p in reference.parameters())


def test_sft_nll_sums_the_target_tokens_only(tiny, modality_split):
    """Oracle: the full forward's logits, log-softmax, picked at the target positions by hand."""
    model, processor = tiny
    samples = modality_split[0][:3]
    prompts = data.collate(samples, processor, "no-think")
    targets = ["<answer>A</answer>", "<answer>B</answer><think>long one</think>",
               "<answer>C</answer>"]
    summed, tokens = modellib.sft_nll(model, processor.tokenizer, prompts, targets)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    nll, count = 0.0, 0
    for i, text in enumerate(targets):
        target = processor.tokenizer(text)["input_ids"] + [end]
        row = inputs.select_rows(prompts, torch.tensor([i]))
        keep = row.attention_mask[0].bool()  # drop this row's left padding
        ids = torch.cat([row.input_ids[0][keep], torch.tensor(target)]).unsqueeze(0)
        types = torch.nn.functional.pad(row.mm_token_type_ids[0][keep], (0, len(target)))
        one = inputs.PromptBatch(ids, torch.ones_like(ids), types.unsqueeze(0), row.pixel_values,
                                 row.image_grid_thw, row.image_counts)
        with torch.no_grad():
            logits = model(**one.model_inputs()).logits[0].log_softmax(-1)
        P = int(keep.sum())
        nll -= sum(logits[P - 1 + t, token].item() for t, token in enumerate(target))
        count += len(target)
    assert tokens == count
    assert summed.item() == pytest.approx(nll, rel=1e-4)


def test_sft_baseline_raises_held_out_accuracy_above_the_base(tiny_path, tmp_path):
    out = run(["train.py", "--algo", "sft", "--steps", "120", "--lr", "1e-3",
               "--output_dir", str(tmp_path), "--eval_every", "0", "--eval_size", "64",
               "--save_every", "0"])
    accuracies = out.split("held-out accuracy: base ")[1].split(" (")[0]
    base, final = [float(x) for x in accuracies.split(" -> final ")]
    assert final > base + 0.2, out[-500:]


def test_two_nodes_with_hybrid_sharding_train_like_one(tiny_path, tmp_path):
    """Two torchrun invocations of one process each, joined by a rendezvous on 127.0.0.1:
    2 nodes x 1 rank."""
    args = ["train.py", "--steps", "3", "--lr", "1e-4", *SMALL]
    run([*args, "--output_dir", str(tmp_path / "one")])
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    nodes = [subprocess.Popen(
        [*launcher, "--node_rank", str(rank), *args, "--hybrid_shard", "true",
         "--output_dir", str(tmp_path / "nodes")], cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "nodes")
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "nodes" / "final" / "model.safetensors")
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5)


def test_epochs_set_the_number_of_steps(tiny_path, tmp_path):
    """1,280 training questions (the tiny default) x 0.01 epochs / 4 prompts per step = 3.2:
    4 steps."""
    out = run(["train.py", "--epochs", "0.01", "--top_k", "5", "--output_dir", str(tmp_path),
               *SMALL])
    assert "1280 training" in out and "--epochs 0.01: 4 steps of 4 prompts" in out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    config = json.loads((tmp_path / "final" / "train_config.json").read_text())
    assert (config["steps"], config["epochs"], config["top_k"]) == (4, 0.01, 5)
    # Each step logs the learning rate it trained with: linear decay from --lr over 4 steps.
    lrs = [m["lr"] for m in metrics(tmp_path)]
    assert lrs == pytest.approx([config["lr"] * (1 - k / 4) for k in range(4)])


def wandb_history(run_file) -> list[dict]:
    """The logged rows of an offline W&B run file, read without wandb's code: a 7-byte file
    header, then LevelDB's log format (32 KiB blocks of records, each with a 7-byte header: crc,
    length, kind; a record split over blocks is FIRST, MIDDLE..., LAST), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    rows, position, pending = [], 7, b""
    while position + 7 <= len(raw):
        left = 32768 - position % 32768
        length, kind = int.from_bytes(raw[position + 4:position + 6], "little"), raw[position + 6]
        if left < 7 or kind == 0:  # the end of a block is zero padding
            position += left
            continue
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.HasField("history"):
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_every_logged_number(tiny_path, tmp_path):
    pytest.importorskip("wandb")  # in the test install (README); an optional extra otherwise
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "train.py", "--steps", "3", "--rollouts_every", "2",
                           "--report_to", "wandb", *SMALL, "--output_dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {row["_step"]: row for row in wandb_history(run_file) if "loss" in row}
    for expected in metrics(tmp_path):
        for key, value in expected.items():
            assert logged[expected["step"]][key] == pytest.approx(value, rel=1e-6), key
    [table] = (tmp_path / "wandb").glob("offline-run-*/files/media/table/rollouts_2_*.table.json")
    rollout = json.loads((tmp_path / "rollouts.jsonl").read_text().splitlines()[0])
    logged_rows = [[c, sum(r)] for c, r in zip(rollout["completions"], rollout["rewards"])]
    assert json.loads(table.read_text())["data"] == logged_rows


def test_off_policy_updates_recompute_the_samplers_old_logprobs(
        tiny, modality_split, single_process_group, monkeypatch):
    """A bf16 sampler rounds otherwise than the training forward (other batch shapes, cache
    length, kernels), which the first update's ratio would read as a policy change. Here the
    sampler's log-probs are 0.05 off: before several updates they are recomputed, in any
    dtype, so the first update's ratio is exactly 1."""
    model, processor = tiny
    modellib.shard(model, bf16=True)
    prompts = data.collate(modality_split[0][:2], processor, "think-after")
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, prompts, 4, sampler.Decoding(12, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    rollout.logprobs += 0.05 * rollout.completion_mask
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    departures = []  # per update: the largest gap between the policy's and the old log-probs
    real = grpo.policy_loss

    def policy_loss_noting_departures(logprobs, old, ref, advantages, mask, **kw):
        departures.append(((logprobs.detach() - old) * mask).abs().max().item())
        return real(logprobs, old, ref, advantages, mask, **kw)

    monkeypatch.setattr(grpo, "policy_loss", policy_loss_noting_departures)
    rewards = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float32).unsqueeze(1)  # (8, 1)
    cfg = train.Config(num_generations=4, beta=0.0, num_iterations=2, dtype="bf16")
    metrics = train.update_policy(cfg, model, None, optimizer, schedule, prompts, rollout, rewards)
    # Recomputed on the policy as it is then: ratio 1, then a departure. The gap is logged.
    assert departures[0] == 0 and departures[1] > 0
    assert metrics["logprob_gap_max"] == pytest.approx(0.05, abs=0.02)


def test_the_samplers_gap_is_zero_in_fp32(step_inputs):
    metrics = grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1])
    assert metrics["logprob_gap"] < 1e-5 and metrics["logprob_gap_max"] < 1e-5
    assert metrics["gap_clip_frac"] == 0


@pytest.mark.parametrize("updates", [{}, {"num_iterations": 2, "minibatches": 2}],
                         ids=["on-policy", "off-policy"])
def test_an_offset_in_the_samplers_logprobs_shows_in_the_gap(step_inputs, updates):
    """Sampler log-probs 0.3 too high: the training forward's are 0.3 lower, a ratio of
    e^-0.3 = 0.74, below the clip range's 0.8 on every token, whichever forward measures it."""
    rollout = step_inputs[-1]
    rollout.logprobs += 0.3 * rollout.completion_mask
    metrics = grpo_step(step_inputs, [0, 1, 0, 1, 1, 0, 0, 1], **updates)
    assert metrics["logprob_gap"] == pytest.approx(0.3, abs=1e-5)
    assert metrics["logprob_gap_max"] == pytest.approx(0.3, abs=1e-5)
    assert metrics["gap_clip_frac"] == 1.0
