"""Training stages, checkpoints, strategies and flags on a tiny synthetic task (CPU).

The model has the tiny backbone (the training loop does not depend on ResNet50's
numbers), and each test runs few steps on 6 images of 64 px (3 classes, 2 each)
with a batch of all 6: every step sees the same images and the loss is comparable
from step to step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from delf_tf.config import ModelConfig, TrainingConfig
from delf_tf.testing.synthetic_training import write_pattern_dataset

ROOT = Path(__file__).resolve().parents[2]
SMALL_MODEL = ModelConfig(backbone="tiny", feature_depth=32, attention_hidden_units=16)
# The same model as `delf train` flags.
SMALL_MODEL_FLAGS = ["--backbone=tiny", "--feature_depth=32", "--attention_hidden_units=16"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "train"
    write_pattern_dataset(root, num_classes=3, images_per_class=2, size=64, pattern_size=32)
    return root


def tiny_config(folder: Path, model_dir: Path, **changes) -> TrainingConfig:
    base = dict(
        train_data=str(folder),
        model_dir=str(model_dir),
        batch_size=6,
        image_size=64,
        max_steps=16,
        weights="random",
        log_every=1,
        checkpoint_every=100,
        image_summary_every=0,
        eval_every=0,
        crop_area_range=(1.0, 1.0),
        attention_scale_range=(1.0, 1.0),
        shuffle_buffer=8,
    )
    base.update(changes)
    return TrainingConfig(**base)


def losses(history, name):
    return np.array([entry[name] for entry in history])


def test_descriptor_stage_loss_goes_down_and_model_is_extractable(image_folder, tmp_path):
    from delf_tf.extraction import build_extractor
    from delf_tf.training.trainer import train

    result = train(
        tiny_config(image_folder, tmp_path, stage="descriptor", image_summary_every=16),
        SMALL_MODEL,
    )
    loss = losses(result.history, "loss/descriptor")
    assert len(loss) == 16 and np.all(np.isfinite(loss))
    assert loss[-3:].mean() < 0.6 * loss[0], loss
    assert "loss/attention" not in result.history[0]
    # Weight decay is in the loss: the regularisation term is reported and positive.
    assert result.history[0]["loss/regularization"] > 0
    assert result.num_classes == 3
    # The final .keras model is what `delf extract --model` takes.
    extractor = build_extractor(model=result.model_path, overrides={"score_threshold": 0.0})
    image = np.zeros((64, 64, 3), np.uint8)
    assert len(extractor.extract(image)) > 0
    # TensorBoard: scalars and attention images are in the event files.
    tags = _event_tags(tmp_path / "train")
    assert {"loss/descriptor", "learning_rate", "accuracy/descriptor"} <= tags
    assert {"attention/heat", "attention/overlay"} <= tags


def test_attention_stage_trains_head_and_leaves_backbone_unchanged(image_folder, tmp_path):
    from delf_tf.training.trainer import Trainer

    config = tiny_config(image_folder, tmp_path, stage="attention", initial_lr=0.1)
    trainer = Trainer(config, SMALL_MODEL)
    backbone_before = [np.array(w) for w in trainer.model.backbone.weights]
    head_before = [np.array(w) for w in trainer.model.attention.weights]
    result = trainer.run()
    loss = losses(result.history, "loss/attention")
    assert loss[-3:].mean() < loss[0] - 0.05, loss
    backbone_after = trainer.model.backbone.weights
    # 5 conv kernels, 5 batch norms of 4 variables (including the moving statistics).
    assert len(backbone_before) == len(backbone_after) == 5 + 5 * 4
    for before, after in zip(backbone_before, backbone_after, strict=True):
        np.testing.assert_array_equal(before, np.array(after), err_msg=after.path)
    changed = [
        not np.array_equal(b, np.array(a))
        for b, a in zip(head_before, trainer.model.attention.weights, strict=True)
    ]
    assert any(changed)


def test_mixed_precision_uses_loss_scaling_and_saves_float32(image_folder, tmp_path):
    import keras

    from delf_tf.training.trainer import Trainer

    config = tiny_config(
        image_folder, tmp_path, stage="attention", mixed_precision=True, initial_lr=0.1, max_steps=8
    )
    trainer = Trainer(config, SMALL_MODEL)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert trainer.model.attention.dtype_policy.compute_dtype == "float16"
    result = trainer.run()
    loss = losses(result.history, "loss/attention")
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    assert result.history[-1]["loss_scale"] > 1
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    saved = keras.saving.load_model(result.model_path)
    outputs = saved(np.zeros((1, 32, 32, 3), np.float32))
    assert {str(value.dtype) for value in outputs.values()} == {"<dtype: 'float32'>"}


def test_joint_stage_trains_both_heads(image_folder, tmp_path):
    from delf_tf.training.trainer import train

    result = train(tiny_config(image_folder, tmp_path, stage="joint", max_steps=14), SMALL_MODEL)
    total = losses(result.history, "loss/total")
    assert {"loss/descriptor", "loss/attention"} <= set(result.history[0])
    assert total[-3:].mean() < total[0] - 0.3, total


def test_rescaled_sizes_cover_the_range_and_repeat_per_step():
    from delf_tf.training.trainer import rescaled_size

    config = TrainingConfig(image_size=320, attention_scale_range=(0.25, 1.0), seed=3)
    sizes = [rescaled_size(config, step) for step in range(400)]
    assert min(sizes) <= 96 and max(sizes) >= 304
    assert all(80 <= size <= 320 and size % 16 == 0 for size in sizes)
    assert sizes == [rescaled_size(config, step) for step in range(400)]


def test_flags_and_flagfile_give_the_config(tmp_path):
    from delf_tf.commands import train as command

    flagfile = tmp_path / "run.flags"
    flagfile.write_text(
        "\n".join(
            [
                "--stage=attention",
                "--train_data=/data/train-*",
                "--val_data=/data/validation-*",
                "--num_classes=7",
                "--batch_size=16",
                "--image_size=224",
                "--initial_lr=0.005",
                "--max_steps=123",
                "--lr_schedule=cosine",
                "--strategy=mirrored",
                "--tpu=",
                "--mixed_precision",
                "--model_dir=/runs/attention",
                "--weights=random",
                "--init_from=/runs/descriptor/model.keras",
                "--seed=5",
                "--attention_scale_range=0.5,1.0",
                "--weight_decay=0.001",
                "--backbone=tiny",
                "--feature_depth=48",
            ]
        )
    )
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    flag_values(["train", f"--flagfile={flagfile}"])
    config, model = command.configs_from_flags(flag_values)
    assert config == TrainingConfig(
        stage="attention",
        train_data="/data/train-*",
        val_data="/data/validation-*",
        num_classes=7,
        batch_size=16,
        image_size=224,
        initial_lr=0.005,
        max_steps=123,
        lr_schedule="cosine",
        strategy="mirrored",
        mixed_precision=True,
        model_dir="/runs/attention",
        weights="random",
        init_from="/runs/descriptor/model.keras",
        seed=5,
        attention_scale_range=(0.5, 1.0),
    )
    assert model == ModelConfig(weight_decay=0.001, backbone="tiny", feature_depth=48)
    # The sample flag files parse too.
    for sample in sorted((ROOT / "training" / "configs").glob("*.flags")):
        fresh = flags.FlagValues()
        command.define_flags(fresh)
        fresh(["train", f"--flagfile={sample}"])
        command.configs_from_flags(fresh)


def _env():
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }


@pytest.mark.heavy
@pytest.mark.parametrize(
    "model_flags",
    [
        ["--stage=attention", *SMALL_MODEL_FLAGS],
        ["--stage=joint", "--architecture=delg_resnet50", "--backbone=tiny"],
    ],
    ids=["delf_attention", "delg"],
)
def test_sigkill_then_restart_resumes_from_last_checkpoint(image_folder, tmp_path, model_flags):
    model_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "delf_tf.cli",
        "train",
        f"--train_data={image_folder}",
        f"--model_dir={model_dir}",
        "--weights=random",
        *model_flags,
        "--batch_size=6",
        "--image_size=64",
        "--checkpoint_every=2",
        "--log_every=1",
        "--image_summary_every=0",
    ]
    first = subprocess.Popen(
        [*args, "--max_steps=100000"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = str(model_dir / "checkpoints")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            latest = tf.train.latest_checkpoint(checkpoints)
            if latest and int(latest.rsplit("-", 1)[1]) >= 4:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it was killed"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    killed_at = int(tf.train.latest_checkpoint(checkpoints).rsplit("-", 1)[1])
    assert killed_at >= 4 and killed_at % 2 == 0
    flagfile = tmp_path / "resume.flags"
    flagfile.write_text("\n".join([*args[4:], f"--max_steps={killed_at + 3}"]))
    second = subprocess.run(
        [*args[:4], f"--flagfile={flagfile}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == killed_at
    assert summary["final_step"] == killed_at + 3
    assert f"at step {killed_at}" in second.stderr  # "restored ... at step N"
    assert Path(summary["model_path"]).is_file()


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from delf_tf.config import ModelConfig, TrainingConfig
from delf_tf.training.trainer import Trainer
config = TrainingConfig.from_json(sys.argv[1])
trainer = Trainer(config, ModelConfig.from_json(sys.argv[2]))
result = trainer.run()
variable = trainer.model.attention.weights[0]
replicas = [v.numpy() for v in trainer.strategy.experimental_local_results(variable.value)]
print(json.dumps({
    "replicas": trainer.strategy.num_replicas_in_sync,
    "in_sync": all((r == replicas[0]).all() for r in replicas),
    "copies": len(replicas),
    "loss": [h["loss/attention"] for h in result.history],
}))
"""


@pytest.mark.heavy
def test_mirrored_strategy_on_two_logical_cpus(image_folder, tmp_path):
    config = tiny_config(
        image_folder, tmp_path, stage="attention", strategy="mirrored", initial_lr=0.1, max_steps=16
    )
    run = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, config.to_json(), SMALL_MODEL.to_json()],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["copies"] == 2 and out["in_sync"]
    # Each step sees another random rescale of the images, so single-step losses are
    # noisy (and replica all-reduce order varies): compare the first and last quarters.
    loss = np.asarray(out["loss"])
    assert len(loss) == 16 and np.all(np.isfinite(loss))
    assert loss[-4:].mean() < loss[:4].mean(), loss


def _event_tags(folder: Path) -> set[str]:
    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    return tags


TINY_DELG = ModelConfig(architecture="delg_resnet50", backbone="tiny")


def test_delg_trains_global_attention_and_reconstruction_jointly(image_folder, tmp_path):
    from delf_tf.model.reference_nets import ReferenceModel
    from delf_tf.training.trainer import Trainer

    # Reconstruction weight 3 (default 10, the reference's): in 30 steps of a random tiny
    # net the autoencoder otherwise serves the reconstruction before the attention.
    config = tiny_config(
        image_folder,
        tmp_path,
        stage="joint",
        max_steps=30,
        initial_lr=0.1,
        reconstruction_loss_weight=3.0,
        checkpoint_every=15,
    )
    trainer = Trainer(config, TINY_DELG)
    scale_before = float(trainer.heads.scale.numpy())
    assert scale_before == pytest.approx(45.25)
    result = trainer.run()
    for name in ("loss/global", "loss/attention", "loss/reconstruction"):
        loss = losses(result.history, name)
        assert np.all(np.isfinite(loss)) and loss[-3:].mean() < 0.9 * loss[0], (name, loss)
    assert result.history[-1]["accuracy/global"] == 1.0
    assert float(trainer.heads.scale.numpy()) != scale_before  # the scale is learnt
    # The saved model is the plain ReferenceModel (no class heads), the checkpoint has them.
    import keras

    saved = keras.saving.load_model(result.model_path)
    assert isinstance(saved, ReferenceModel) and saved.config.architecture == "delg_resnet50"
    for mine, theirs in zip(trainer.model.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(np.array(mine), np.array(theirs))

    # A new run in the same model_dir resumes from the last checkpoint, heads included.
    resumed = Trainer(config.replace(max_steps=32), TINY_DELG)
    assert resumed.restore() == 30
    assert float(resumed.heads.scale.numpy()) == float(trainer.heads.scale.numpy())
    np.testing.assert_array_equal(
        resumed.heads.cosine_weights.numpy(), trainer.heads.cosine_weights.numpy()
    )
    again = resumed.run()
    assert (again.start_step, again.final_step) == (30, 32)
    assert losses(again.history, "loss/global")[-1] < 0.5
    # The paper's model cannot resume DELG's checkpoints: refused in one line.
    from delf_tf.errors import InputError

    with pytest.raises(InputError, match="architecture 'delg_resnet50'"):
        Trainer(config.replace(max_steps=34), SMALL_MODEL).restore()


def test_delg_refuses_other_stages_and_imagenet_weights(image_folder, tmp_path):
    from delf_tf.errors import InputError
    from delf_tf.training.trainer import Trainer

    with pytest.raises(InputError, match="joint only"):
        Trainer(tiny_config(image_folder, tmp_path, stage="descriptor"), TINY_DELG)
    with pytest.raises(InputError, match="--weights=imagenet"):
        Trainer(tiny_config(image_folder, tmp_path, stage="joint", weights="imagenet"), TINY_DELG)


def test_resnet_v1_50_trains_with_a_descriptor_classifier(image_folder, tmp_path):
    from delf_tf.training.trainer import train

    model = ModelConfig(architecture="resnet_v1_50", backbone="tiny")
    config = tiny_config(image_folder, tmp_path, stage="joint", max_steps=8, initial_lr=0.1)
    result = train(config, model)
    descriptor = losses(result.history, "loss/descriptor")
    assert "loss/reconstruction" not in result.history[0]  # no autoencoder
    assert result.history[0]["loss/regularization"] > 0  # --weight_decay reaches the loss
    assert np.all(np.isfinite(losses(result.history, "loss/attention")))
    assert descriptor[-2:].mean() < descriptor[0], descriptor


@pytest.mark.heavy
def test_delg_mixed_precision_trains_and_saves_float32(image_folder, tmp_path):
    import keras

    from delf_tf.training.trainer import train

    config = tiny_config(
        image_folder, tmp_path, stage="joint", mixed_precision=True, initial_lr=0.1, max_steps=8
    )
    result = train(config, TINY_DELG)
    # The first steps overflow at the initial loss scale and are skipped; then it learns.
    loss = losses(result.history, "loss/global")
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0] - 0.5, loss
    assert np.isfinite(result.history[-1]["gradient_norm"])
    saved = keras.saving.load_model(result.model_path)
    outputs = saved(np.zeros((1, 64, 64, 3), np.float32))
    assert {str(value.dtype) for value in outputs.values()} == {"<dtype: 'float32'>"}


def test_a_model_dir_of_another_stage_or_architecture_is_refused(tmp_path):
    """Resuming a --model_dir that an earlier run recorded with another stage or
    architecture is one line naming what it holds; the same ones pass."""
    from delf_tf.errors import InputError
    from delf_tf.training import trainer

    (tmp_path / trainer.TRAINING_CONFIG_FILE).write_text(
        TrainingConfig(stage="descriptor").to_json()
    )
    (tmp_path / trainer.MODEL_CONFIG_FILE).write_text(
        ModelConfig(backbone="tiny", architecture="delf").to_json()
    )
    trainer._check_same_stage(str(tmp_path), "descriptor")
    trainer._check_same_architecture(str(tmp_path), "delf")
    with pytest.raises(InputError, match="checkpoints of stage 'descriptor', not 'attention'"):
        trainer._check_same_stage(str(tmp_path), "attention")
    with pytest.raises(InputError, match="architecture 'delf', not 'delg_resnet50'"):
        trainer._check_same_architecture(str(tmp_path), "delg_resnet50")
    trainer._check_same_stage(str(tmp_path / "fresh"), "attention")  # nothing recorded
