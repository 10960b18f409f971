"""The command line a Hugging Face user expects: every flag honoured or refused by name, the
paper's presets per backbone, missing models named in one line, progress on long passes, and
the one-GPU memory features (gradient checkpointing, bf16 weights with fp32 adapters, 4-bit).

    python -m pytest -q tests/test_cli.py
"""
import argparse
import json
import math
import os

import pytest
import torch
from PIL import Image

import config
import distill
import model as M
import toy.default
import train
from conftest import gradcache_step, random_lora_b


def refused(capsys, argv):
    """argparse's one-line error for argv (it exits with status 2)."""
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("stage, flag", [
    (2, ["--teacher", "t"]), (2, ["--teacher-pooling", "cls"]), (2, ["--teacher-cache", "c"]),
    (2, ["--eval-pairs", "5"]), (2, ["--hard-negatives"]), (2, ["--kd-direction",
                                                                   "student-teacher"]),
    (2, ["--load-in-4bit"]), (1, ["--k", "4"]), (1, ["--beta", "0.2"]),
    (1, ["--negatives", "easy"]), (1, ["--image-size", "64"]), (1, ["--init", "base"]),
    (1, ["--image-root", "x"]), (1, ["--skip-missing-images"])])
def test_a_flag_of_the_other_stage_is_refused_by_name(capsys, tiny_path, tmp_path, stage, flag):
    argv = ["--stage", str(stage), "--model", tiny_path, "--out", str(tmp_path / "o"), *flag]
    line = refused(capsys, argv)
    assert f"{flag[0]} is a stage-{3 - stage} flag" in line


@pytest.mark.parametrize("argv, words", [
    (["--stage", "2", "--data", "x.jsonl"], "--data belongs with --model"),
    (["--stage", "2", "--image-root", "x"], "--image-root belongs with --model"),
    (["--stage", "1", "--preset", "paper"], "--preset needs --model"),
    (["--stage", "1", "--epochs", "1", "--max-steps", "5"], "give one"),
    (["--stage", "1", "--resume", "--overwrite"], "give one"),
])
def test_contradicting_or_unused_flags_are_refused(capsys, argv, words):
    assert words in refused(capsys, argv)


def test_a_real_model_needs_out_and_init_is_the_toys(capsys, tiny_path):
    assert "--model needs --out" in refused(capsys, ["--stage", "1", "--model", tiny_path])
    assert "--init chooses" in refused(capsys, ["--stage", "2", "--model", tiny_path, "--out",
                                                "o", "--init", "base"])


def test_lora_shape_without_a_lora_is_refused_also_for_the_toys_full_fine_tune():
    args = config.parse_args(["--stage", "2", "--init", "base", "--lora-alpha", "8"])
    assert toy.default.settings(2, "base")["lora_r"] == 0  # the toy's stage 2
    with pytest.raises(SystemExit, match="--lora-r 0"):
        config.resolve(args, toy.default.settings(2, "base"))


def test_toy_honours_eval_pairs():
    assert len(train.configure(["--stage", "1", "--eval-pairs", "7"])[1]["heldout"]) == 7


# ---------------------------------------------------------------- numbers, checked before any work

def numbers_refused(argv):
    """The one-line message for a bad number (SystemExit with the message as its code)."""
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize("stage, flag, value, allowed", [
    (1, "--grad-clip", "-1", "0 or more (0: no clipping)"), (1, "--grad-clip", "nan", "0 or more"),
    (1, "--workers", "-1", "0 or more"), (1, "--lora-r", "-4", "0 or more"),
    (1, "--lora-dropout", "1", "in [0, 1)"), (1, "--lora-dropout", "-0.1", "in [0, 1)"),
    (1, "--weight-decay", "-0.01", "0 or more"), (1, "--weight-decay", "nan", "0 or more"),
    (2, "--k", "0", "at least 1"), (2, "--beta", "-inf", "a number, inf or none"),
    (1, "--tau", "nan", "a positive number"), (2, "--tau", "inf", "a positive number"),
    (1, "--lr", "nan", "a positive number"), (1, "--lr", "inf", "a positive number"),
    (1, "--max-steps", "0", "at least 1"), (1, "--batch-size", "1", "at least 2"),
    (1, "--chunk-size", "0", "at least 1"), (1, "--save-every", "0", "at least 1"),
    (1, "--log-every", "0", "at least 1"), (1, "--eval-pairs", "-1", "0 or more"),
    (2, "--alpha", "-1", "0 or more"), (2, "--alpha", "nan", "0 or more"),
    (2, "--toy-duplicates", "1", "in [0, 1)"), (1, "--epochs", "0", "a positive number"),
    (1, "--epochs", "nan", "a positive number"), (1, "--warmup", "-1", "0 or more"),
    (1, "--lora-alpha", "0", "a positive number"), (1, "--lora-alpha", "-8", "a positive number"),
])
def test_a_number_out_of_range_is_refused_naming_the_flag_and_its_range(stage, flag, value,
                                                                        allowed):
    extra = ["--loss", "hardness-weighted"] if flag == "--alpha" else []
    line = numbers_refused(["--stage", str(stage), f"{flag}={value}", *extra])
    assert line.startswith(f"{flag} must be ") and allowed in line
    assert line.rsplit(", got ", 1)[1] in (value, str(float(value)))  # the value given


def test_the_toys_stage_2_refuses_a_bad_number_before_its_stage_1_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/stage1 here: the toy's stage 2 would run stage 1 first
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a training run started"))
    with pytest.raises(SystemExit, match="^--k must be at least 1, got 0$"):
        train.main(["--stage", "2", "--k", "0"])
    assert not (tmp_path / "runs").exists()


def test_grad_clip_0_clips_nothing_and_still_logs_the_norm(tiny_path):
    """--grad-clip 0 means no clipping (HF's max_grad_norm=0), not a gradient scaled to 0: one
    step with it moves the weights exactly as a step with an infinite clip does."""
    texts = ["a red circle", "a blue square", "two green crosses", "a purple star"]
    moved = {}
    for clip in (0.0, math.inf):
        torch.manual_seed(0)
        model, processor, family = M.load_mllm(tiny_path)
        args = argparse.Namespace(stage=2, lora_r=4, lora_alpha=8, lora_dropout=0.0, loss="unime",
                                  k=2, beta=0.1, tau=0.02, negatives="hard", grad_clip=clip,
                                  out="o")
        train.add_trainable(model, family, args)
        random_lora_b(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        batch = {"sides": {"qry": [([0, 1, 2, 3], M.process(processor, family, texts=texts))],
                           "pos": [([0, 1, 2, 3], M.process(processor, family,
                                                          texts=texts[1:] + texts[:1]))]}}
        loss, norm, _ = train.train_step(args, 0, model.train(), opt, batch, None,
                                         torch.Generator(), 1, "cpu", None)
        moved[clip] = {n: p.detach() - before[n] for n, p in model.named_parameters()
                       if p.requires_grad}
        assert norm > 1.5  # a norm that a clip to 1 would have scaled down
    assert all(torch.equal(moved[0.0][n], moved[math.inf][n]) for n in moved[0.0])
    assert any(d.abs().max() > 0 for d in moved[0.0].values())  # the weights did move


def test_eval_refuses_numbers_out_of_range_before_reading_data(capsys):
    import eval as ev
    for flag, value in (("--batch-size", "0"), ("--max-captions", "0"), ("--limit", "-1")):
        with pytest.raises(SystemExit):
            ev.parse_args(["--task", "retrieval", "--model", "m", "--data", "x.jsonl", flag,
                           value])
        assert f"{flag} must be at least 1, got {value}" in capsys.readouterr().err


# ---------------------------------------------------------------- presets

def resolved(argv):
    return config.resolve(config.parse_args(argv))


def fake_model(folder, model_type):
    """A config.json alone: what --preset paper reads (an MLLM's has a vision tower's config;
    Phi-3.5-V's is called img_processor)."""
    os.makedirs(folder)
    vision = "img_processor" if model_type == "phi3_v" else "vision_config"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": model_type, vision: {}}, f)
    return str(folder)


@pytest.mark.parametrize("model_type, preset, lr", [
    ("phi3_v", "paper-phi35v", 1e-4), ("llava_next", "paper-llava16", 2e-5),
    ("llava_onevision", "paper-llava-ov", 1e-4)])
def test_preset_paper_picks_the_backbones_settings(tmp_path, model_type, preset, lr):
    model = fake_model(tmp_path / "m", model_type)
    args = resolved(["--stage", "2", "--preset", "paper", "--model", model, "--out", "o"])
    assert config.preset_name(args) == preset
    assert (args.lr, args.batch_size, args.max_steps, args.lora_r, args.tau) == \
        (lr, 1024, 1000, 16, 0.02)  # Table 6
    assert args.trust_remote_code is False  # only the command line turns remote code on
    stage1 = resolved(["--stage", "1", "--preset", "paper", "--model", model, "--out", "o"])
    assert (stage1.lr, stage1.batch_size, stage1.epochs, stage1.lora_r) == (5e-4, 768, 2, 32)


def test_preset_paper_refuses_a_family_the_paper_did_not_train(tiny_path):
    with pytest.raises(SystemExit, match="is 'llava'. Name a preset"):
        resolved(["--stage", "2", "--preset", "paper", "--model", tiny_path, "--out", "o"])
    args = resolved(["--stage", "2", "--preset", "paper", "--model", tiny_path, "--family",
                     "llava_next", "--out", "o"])
    assert args.lr == 2e-5


def test_flags_given_on_the_command_line_beat_the_preset(tmp_path):
    model = fake_model(tmp_path / "m", "phi3_v")
    base = ["--preset", "paper-llava16", "--model", model, "--out", "o"]
    args = resolved(["--stage", "2", *base, "--max-steps", "5", "--lr", "3e-4", "--batch-size",
                     "64", "--lora-dropout", "0.0", "--tau", "0.05"])
    assert (args.max_steps, args.lr, args.batch_size, args.lora_dropout, args.tau) == \
        (5, 3e-4, 64, 0.0, 0.05)
    by_epochs = resolved(["--stage", "2", *base, "--epochs", "1"])
    assert by_epochs.max_steps is None and by_epochs.epochs == 1  # not the preset's 1000 steps
    assert config.fit_to_data(by_epochs, 5000).max_steps == 5000 // 1024  # one pass
    by_steps = resolved(["--stage", "1", *base, "--max-steps", "7"])
    assert by_steps.epochs is None and by_steps.max_steps == 7  # not the preset's 2 epochs
    full = resolved(["--stage", "2", *base, "--lora-r", "0"])  # the preset's LoRA shape is not
    assert full.lora_r == 0  # refused: only a shape given on the command line is


def test_each_value_comes_from_the_first_layer_that_sets_it():
    """command line > preset > the toy's settings > DEFAULTS > the loss's own defaults."""
    toy_run = config.resolve(config.parse_args(["--stage", "2", "--init", "base", "--lr",
                                                "7e-4"]), toy.default.settings(2, "base"))
    assert toy_run.lr == 7e-4  # the command line
    assert toy_run.max_steps == toy.default.SETTINGS[2]["max_steps"]  # the toy's
    assert toy_run.beta == config.DEFAULTS[2]["beta"]  # the toy sets no β: the stage default
    assert toy_run.k == config.LOSSES["unime"]["k"]  # the loss's own
    assert (toy_run.model, toy_run.out) == (toy.default.PRETRAINED, "runs/stage2-base")


# ---------------------------------------------------------------- missing models, progress

def test_a_missing_student_fails_in_one_line_before_any_teacher_work(tmp_path):
    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1\n" + "".join(f"a{i},b{i}\n" for i in range(40)))
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "1", "--model", str(tmp_path / "no-such-model"), "--data",
                    str(nli), "--out", str(tmp_path / "o"), "--teacher", "all-MiniLM-L6-v2",
                    "--teacher-cache", str(tmp_path / "t.pt"), "--batch-size", "8"])
    message = str(e.value.code)
    assert message.startswith("no such folder:") and "no-such-model" in message
    assert "\n" not in message
    assert not (tmp_path / "t.pt").exists()  # the teacher never ran


@pytest.mark.slow
def test_a_missing_teacher_is_named_in_one_line():
    with pytest.raises(SystemExit) as e:
        distill.load_teacher("no-such-org/no-such-teacher-xyz")
    message = str(e.value.code)
    assert message.startswith("cannot load teacher 'no-such-org/no-such-teacher-xyz'")
    assert "\n" not in message


def test_progress_prints_counts_and_an_eta_and_short_passes_stay_quiet(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 40.0, 50.0, 60.0])
    monkeypatch.setattr(M, "time", argparse.Namespace(time=lambda: next(clock)))
    report = M.progress("teacher", 100, every=15)
    report(10)  # t=10: too soon
    report(25)  # t=20: 25 of 100 after 20 s -> 60 s to go
    report(100)  # the end of a pass that printed: a last line
    assert capsys.readouterr().out.splitlines() == ["teacher: 25/100 (20s, ETA 60s)",
                                                    "teacher: 100/100 (40s, ETA 0s)"]
    quiet = M.progress("short", 3, every=15)
    quiet(3)  # t=60: done 10 s after the start, nothing printed before
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- memory

def lora_model(path, dropout, dtype=torch.float32):
    model, processor, family = M.load_mllm(path, dtype=dtype)
    args = argparse.Namespace(stage=2, lora_r=4, lora_alpha=8, lora_dropout=dropout)
    train.add_trainable(model, family, args)
    return random_lora_b(model), processor, family


def mixed_sides(processor, family):
    texts = ["a red circle", "a blue square", "two green crosses", "a purple star"]
    images = [Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 90)) for i in range(4)]
    return {"qry": [([0, 1, 2, 3], M.process(processor, family, texts=texts))],
            "pos": [([0, 1], M.process(processor, family, images=images[:2])),
                    ([2, 3], M.process(processor, family, images=images[2:]))]}


def test_gradient_checkpointing_keeps_gradcache_exact_with_lora_dropout(tiny_path):
    """The recomputation in the backward and GradCache's replay must both draw the dropout
    masks of the first pass: the gradients with checkpointing equal those without."""
    import hardneg
    model, processor, family = lora_model(tiny_path, dropout=0.2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sides = mixed_sides(processor, family)
    layer = model.model.language_model.layers[0].self_attn  # inside the checkpointed forward
    calls = []  # a pre-hook: the recomputation stops once it has what the backward needs
    layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def step():
        calls.clear()
        torch.manual_seed(3)
        gradcache_step(model, sides, lambda r: (hardneg.hardneg_loss(
            r["qry"], r["pos"], k=2, beta=0.1), {}), "cpu", None)
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return grads, len(calls)
    plain, plain_calls = step()
    M.checkpoint_activations(model)
    checkpointed, checkpointed_calls = step()
    assert checkpointed_calls > plain_calls  # the backward did recompute the layer
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.manual_seed(4)  # another dropout draw changes them: the masks were on
    gradcache_step(model, sides, lambda r: (hardneg.hardneg_loss(
        r["qry"], r["pos"], k=2, beta=0.1), {}), "cpu", None)
    assert any(not torch.allclose(p.grad, g, atol=1e-4) for p, g in zip(params, plain))


def test_bf16_frozen_weights_keep_fp32_adapters_and_gradients(tiny_path):
    model, processor, family = lora_model(tiny_path, dropout=0.1, dtype=torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    model.train()
    import hardneg
    gradcache_step(model, mixed_sides(processor, family), lambda r: (
        hardneg.hardneg_loss(r["qry"], r["pos"], k=2, beta=0.1), {}), "cpu", torch.bfloat16)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in trainable)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_4bit_without_cuda_or_bitsandbytes_is_refused_in_one_line(capsys, tiny_path, tmp_path):
    line = refused(capsys, ["--stage", "1", "--model", tiny_path, "--out", str(tmp_path / "o"),
                            "--load-in-4bit", "--device", "cpu"])
    assert "--load-in-4bit needs a CUDA --device and bitsandbytes (pip install bitsandbytes)" \
        in line
    assert "torch sees no CUDA GPU" in refused(capsys, ["--stage", "1", "--device", "cuda"])


def test_an_adapter_is_never_folded_into_quantized_weights():
    base = torch.nn.Linear(4, 3)
    base.weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot be folded into 4-bit weights"):
        M.LoRALinear(base, r=2).merged()


def test_eval_refuses_retrieval_settings_for_other_tasks(capsys):
    import eval as ev
    with pytest.raises(SystemExit):
        ev.parse_args(["--task", "sugarcrepe", "--model", "m", "--limit", "5"])
    assert "--limit is a retrieval setting" in capsys.readouterr().err
