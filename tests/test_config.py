import json

import pytest

from delf_tf.config import DEFAULT_SCALES, ExtractionConfig, ModelConfig
from delf_tf.errors import ConfigError


def test_extraction_defaults_are_the_papers():
    config = ExtractionConfig()
    assert config.scales == DEFAULT_SCALES == (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
    assert config.score_threshold == 100.0
    assert config.max_features == 1000
    assert config.max_image_size == 1024
    assert config.iou_threshold == 1.0
    assert config.pca_dim == 40


@pytest.mark.parametrize("cls", [ExtractionConfig, ModelConfig])
def test_json_round_trip(cls, tmp_path):
    config = cls()
    changed = (
        config.replace(scales=(0.5, 1.0), score_threshold=0.0)
        if cls is ExtractionConfig
        else config.replace(num_classes=7, weight_decay=0.0)
    )
    assert cls.from_json(changed.to_json()) == changed
    path = tmp_path / "config.json"
    changed.save(path)
    assert cls.load(path) == changed
    assert json.loads(path.read_text()) == changed.to_dict()


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"score_treshold": 0}')
    with pytest.raises(ValueError, match=r"bad.json.*score_treshold"):
        ExtractionConfig.load(path)


@pytest.mark.parametrize(
    "changes",
    [{"scales": ()}, {"max_features": 0}, {"iou_threshold": 0.0}, {"max_image_size": 0}],
)
def test_invalid_values_are_refused(changes):
    (field,) = changes
    with pytest.raises(ValueError, match=field):
        ExtractionConfig(**changes)


def test_model_backbones_and_feature_depth():
    assert ModelConfig().backbone == "resnet50" and ModelConfig().feature_depth == 1024
    tiny = ModelConfig(backbone="tiny", feature_depth=64)
    assert ModelConfig.from_json(tiny.to_json()) == tiny
    # A config written before the backbone field existed is the ResNet50 model.
    assert ModelConfig.from_json('{"num_classes": 3}') == ModelConfig(num_classes=3)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"backbone": "vgg16"}, "backbone"),
        ({"feature_depth": 512}, "feature_depth"),  # resnet50 is fixed at 1024
        ({"backbone": "tiny", "feature_depth": 0}, "feature_depth"),
        ({"num_classes": -1}, "num_classes"),
        ({"attention_hidden_units": 0}, "attention_hidden_units"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_invalid_model_values_are_refused(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**changes)
