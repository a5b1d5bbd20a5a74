"""ScheduleFreeCallback / ScheduleFreeTrainer with the real transformers.Trainer."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import sfoptim  # noqa: E402
from sfoptim.integrations.transformers import (  # noqa: E402
    ScheduleFreeCallback,
    ScheduleFreeTrainer,
    warmup_steps_from_args,
)

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def dataset(n: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class Recorder(TrainerCallback):
    """Records x and y after every optimizer step, and the lr it used."""

    def __init__(self):
        self.x, self.y, self.lr, self.mode_at_step = {}, {}, {}, {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.mode_at_step[state.global_step + 1] = optimizer.optimizer.train_mode

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        opt = optimizer.optimizer  # inside Accelerate's wrapper
        step = state.global_step + 1
        # eval_params() follows the optimizer's group order; put x in the
        # order of model.parameters() like y.
        flat = [p for g in opt.param_groups for p in g["params"]]
        by_id = dict(zip(map(id, flat), opt.eval_params()))
        self.x[step] = [by_id[id(p)] for p in model.parameters()]
        self.y[step] = [p.detach().clone() for p in model.parameters()]
        self.lr[step] = opt.param_groups[0]["scheduled_lr"]


def saved_params(folder, model):
    weights = load_file(os.path.join(folder, "model.safetensors"))
    # Tied weights are saved once; take each parameter under any of its names.
    by_param = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in weights:
            by_param[id(p)] = weights[name]
    return [by_param[id(p)] for p in model.parameters()]


def test_checkpoints_and_save_model_hold_x_and_resume(tmp_path):
    model = tiny_model()
    recorder = Recorder()
    trainer = ScheduleFreeTrainer(
        model=model,
        args=make_args(tmp_path / "run"),
        train_dataset=dataset(),
        eval_dataset=dataset(8),
        callbacks=[recorder],
    )
    trainer.train()
    opt = sfoptim.modes.unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, sfoptim.AdamWScheduleFree)

    # The checkpoint at step 3 holds x of step 3, not y.
    ckpt3 = tmp_path / "run" / "checkpoint-3"
    moved = 0
    for saved, x, y in zip(saved_params(ckpt3, model), recorder.x[3], recorder.y[3]):
        assert torch.equal(saved, x)
        moved += not torch.equal(x, y)
    assert moved > 0
    # Training went on at y after saving (step() would raise in eval mode).
    assert recorder.mode_at_step[4] is True
    assert len(recorder.x) == 6

    # After training the model holds x; save_model writes it.
    flat = [p for g in opt.param_groups for p in g["params"]]
    by_id = dict(zip(map(id, flat), opt.eval_params()))
    final_x = [by_id[id(p)] for p in model.parameters()]
    for p, x in zip(model.parameters(), final_x):
        assert torch.equal(p, x)
    trainer.save_model(str(tmp_path / "final"))
    for saved, x in zip(saved_params(tmp_path / "final", model), final_x):
        assert torch.equal(saved, x)

    # The evaluation at step 3 measured x: evaluating the recorded x of
    # step 3 again gives the logged number, and y gives another one.
    logged = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] == 3]
    assert len(logged) == 1

    def evaluate_with(values):
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)
        return trainer.evaluate()["eval_loss"]

    assert evaluate_with(recorder.x[3]) == pytest.approx(logged[0], rel=1e-6)
    assert evaluate_with(recorder.y[3]) != pytest.approx(logged[0], rel=1e-4)

    # Resuming from checkpoint-3 reproduces steps 4-6.
    resumed_model = tiny_model(seed=1)
    resumed = ScheduleFreeTrainer(
        model=resumed_model,
        args=make_args(tmp_path / "run"),
        train_dataset=dataset(),
        eval_dataset=dataset(8),
    )
    resumed.train(resume_from_checkpoint=str(ckpt3))
    for a, b in zip(final_x, resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("warmup", "expected_steps"), [(0.25, 2), (4, 4), (0, 0)])
def test_warmup_ratio_or_steps_reaches_the_optimizer_as_steps(tmp_path, warmup, expected_steps):
    recorder = Recorder()
    trainer = ScheduleFreeTrainer(
        model=tiny_model(),
        args=make_args(tmp_path, max_steps=8, warmup_steps=warmup, save_strategy="no", eval_strategy="no"),
        train_dataset=dataset(),
        callbacks=[recorder],
    )
    trainer.train()
    opt = sfoptim.modes.unwrap_optimizer(trainer.optimizer)
    assert all(g["warmup_steps"] == expected_steps for g in opt.param_groups)
    lr = 1e-2
    first = lr / expected_steps if expected_steps else lr
    assert recorder.lr[1] == pytest.approx(first)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged[0] == pytest.approx(first)
    assert logged[-1] == pytest.approx(lr)


def test_warmup_steps_from_args():
    class Args:
        warmup_steps = 0.05

    assert warmup_steps_from_args(Args(), 100) == 5
    Args.warmup_steps = 7
    assert warmup_steps_from_args(Args(), 100) == 7
    Args.warmup_steps = -1
    with pytest.raises(ValueError, match="warmup"):
        warmup_steps_from_args(Args(), 100)


def test_callback_on_a_plain_trainer(tmp_path):
    model = tiny_model()
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=1e-2)
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, eval_strategy="no", lr_scheduler_type="constant"),
        train_dataset=dataset(),
        optimizers=(opt, None),
        callbacks=[ScheduleFreeCallback(), recorder],
    )
    trainer.train()
    for saved, x in zip(saved_params(tmp_path / "checkpoint-3", model), recorder.x[3]):
        assert torch.equal(saved, x)


def test_callback_refuses_a_plain_optimizer(tmp_path):
    model = tiny_model()
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, eval_strategy="no", save_strategy="no"),
        train_dataset=dataset(),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        callbacks=[ScheduleFreeCallback()],
    )
    with pytest.raises(TypeError, match="schedule-free"):
        trainer.train()
    with pytest.raises(TypeError, match="optimizer_cls"):
        ScheduleFreeTrainer(model=model, args=make_args(tmp_path), optimizer_cls=torch.optim.SGD)


def test_docs_example_runs(tmp_path, monkeypatch):
    from docs_examples import run_doc

    ns = run_doc("transformers", tmp_path, monkeypatch)
    assert ns["trainer"].state.log_history[0]["learning_rate"] == pytest.approx(5e-3)
    model = ns["model"]
    for saved, p in zip(saved_params(tmp_path / "hf_final", model), model.parameters()):
        assert torch.equal(saved, p)  # the model holds x after train()


class StepLoss(TrainerCallback):
    """The loss each optimizer step used, read from the optimizer after the step."""

    def __init__(self):
        self.used = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used.append(sfoptim.modes.unwrap_optimizer(optimizer).param_groups[0]["function_value"])


def test_trainer_hands_the_loss_to_schedule_free_plus(tmp_path):
    """ScheduleFree+ needs the loss: each step gets the loss of its accumulated gradient (what the Trainer logs)."""
    recorder = StepLoss()
    trainer = ScheduleFreeTrainer(
        model=tiny_model(),
        args=make_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, eval_strategy="no", save_strategy="no"),
        train_dataset=dataset(),
        optimizer_cls=sfoptim.AdamCScheduleFreePlus,
        optimizer_kwargs={"lr": 1.0, "weight_decay": 1.0},
        callbacks=[recorder],
    )
    trainer.train()
    opt = sfoptim.modes.unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, sfoptim.AdamCScheduleFreePlus) and opt.param_groups[0]["k"] == 4
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(recorder.used) == len(logged) == 4
    assert recorder.used == pytest.approx(logged, abs=1e-3)
