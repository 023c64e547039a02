import json

import pytest

from delf_tf.config import DEFAULT_SCALES, ExtractionConfig, ModelConfig


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
    with pytest.raises(ValueError):
        ExtractionConfig(**changes)
