"""Every Keras architecture builds on JAX too (keras.ops only), with TensorFlow's numbers.

The tiny model of each architecture is built here (TensorFlow backend), its weights
saved; a subprocess with KERAS_BACKEND=jax builds the same architecture from its
ModelConfig, loads the weights and runs the same images. The subprocess must not
import TensorFlow at all: the network modules import keras only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from delf_tf.config import ModelConfig

pytest.importorskip("jax")

ARCHITECTURES = {
    "delf": ModelConfig(backbone="tiny", feature_depth=32, attention_hidden_units=16),
    "resnet_v1_50": ModelConfig(architecture="resnet_v1_50", backbone="tiny"),
    "delg_resnet50": ModelConfig(architecture="delg_resnet50", backbone="tiny"),
}

JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from delf_tf.config import ModelConfig
    from delf_tf.model.delf import DelfModel
    from delf_tf.model.reference_nets import ReferenceModel
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    folder = sys.argv[1]
    configs = json.loads(open(folder + "/configs.json").read())
    images = np.load(folder + "/images.npy")
    results = {}
    for name, config in configs.items():
        config = ModelConfig.from_dict(config)
        cls = DelfModel if config.architecture == "delf" else ReferenceModel
        model = cls(**config.to_dict())
        model.load_weights(folder + f"/{name}.weights.h5")
        outputs = model(images, training=False)
        for key, value in outputs.items():
            results[f"{name}/{key}"] = np.asarray(value)
    np.savez(folder + "/jax.npz", **results)
    print(json.dumps({"tensorflow_imported": "tensorflow" in sys.modules}))
    """
)


@pytest.mark.heavy
def test_each_architecture_builds_on_jax_with_tensorflows_outputs(tmp_path):
    from delf_tf.model.delf import build_delf_model
    from delf_tf.model.reference_nets import build_reference_model

    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 128, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    expected = {}
    for name, config in ARCHITECTURES.items():
        if config.architecture == "delf":
            model = build_delf_model(config, seed=3)
        else:
            model = build_reference_model(config, seed=3)
        model.save_weights(tmp_path / f"{name}.weights.h5")
        for key, value in model(images, training=False).items():
            expected[f"{name}/{key}"] = np.asarray(value)
    (tmp_path / "configs.json").write_text(
        json.dumps({name: config.to_dict() for name, config in ARCHITECTURES.items()})
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"tensorflow_imported": False}
    with np.load(tmp_path / "jax.npz") as jax_outputs:
        assert set(jax_outputs.files) == set(expected)
        assert "delg_resnet50/global" in expected
        for key, value in expected.items():
            scale = max(float(np.abs(value).max()), 1.0)
            np.testing.assert_allclose(jax_outputs[key], value, atol=1e-4 * scale, err_msg=key)
