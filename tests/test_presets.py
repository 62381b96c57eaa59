"""Model presets: one registry (mklvisita.presets), one factory (create_config) that the config's shortcuts and the
trainer's model_preset both use."""

import pytest

from mklvisita import presets
from mklvisita.config import ConfigError, MKLVisITAConfig, create_config
from training.config import RunConfig, RunConfigError


def test_the_shortcuts_are_the_factorys_presets():
    assert MKLVisITAConfig.tiny() == create_config("tiny")
    assert MKLVisITAConfig.base() == create_config("base") == create_config("base", pretrained=False)
    assert MKLVisITAConfig.base(pretrained=True) == create_config("base-pretrained")
    assert create_config("default") == MKLVisITAConfig()
    tiny = create_config("tiny")
    assert (tiny.vision.image_size, tiny.vision.patch_size, tiny.vision.width, tiny.fusion.layers) == (64, 8, 128, 2)
    base = create_config("base", pretrained=True)
    assert base.vision.pretrained and base.text.model_name == "bert-base-uncased" and base.fusion.width == 512


def test_unknown_presets_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'.*'tiny'"):
        create_config("huge")
    with pytest.raises(ConfigError, match="preset 'tiny'"):
        create_config("tiny", pretrained=True)


def test_a_registered_preset_reaches_the_factory_and_the_trainer(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    presets.register_preset("narrow")(lambda: {**presets.tiny(), "kernels": {"proj_dim": 8}})
    assert create_config("narrow").kernels.proj_dim == 8
    assert RunConfig(model_preset="narrow").model_config().kernels.proj_dim == 8
    with pytest.raises(ValueError, match="registered twice"):
        presets.register_preset("narrow")(presets.tiny)
    with pytest.raises(RunConfigError, match="unknown preset 'huge'"):
        RunConfig(model_preset="huge").model_config()


def test_a_preset_with_a_field_the_config_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    presets.register_preset("typo")(lambda: {"vision": {"widht": 8}})
    with pytest.raises(ConfigError, match="widht.*did you mean 'width'"):
        create_config("typo")


def test_the_photo_preset_is_the_shipped_photo_sources_checkpoints_config():
    import json

    from mklvisita.matcher import EMBEDDED

    shipped = MKLVisITAConfig.from_dict(json.loads((EMBEDDED["photo-sources"] / "config.json").read_text())).to_dict()
    concept = shipped["kernels"]["options"]["concept"]
    preset = create_config("photo", synsets=concept["synsets"], links=concept["synset_links"]).to_dict()
    shipped["text"].pop("backbone_config")  # the text backbone's own config, filled in when the model is built
    preset["text"].pop("backbone_config")
    assert preset == shipped
    bridge = create_config("photo", bridge=True)
    assert bridge.kernels.sources == ["concept"] and bridge.kernels.options["concept"]["prompts"] == "photo"
    assert not bridge.fusion.enabled and bridge.ranking.k == 0
