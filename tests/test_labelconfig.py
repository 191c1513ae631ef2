import pytest

from backend.ls.labelconfig import LabelConfigError, parse_label_config

CONFIG = """<View>
  <Image name="img" value="$photo"/>
  <TextArea name="prompt" toName="img"/>
  <RectangleLabels name="box" toName="img">
    <Label value="Cat"/>
    <Label value="dog" predicted_values="puppy, hound"/>
    <Label value="red car"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="img">
    <Label value="Cat"/>
    <Label value="dog"/>
    <Label value="person"/>
  </BrushLabels>
</View>"""


def test_parses_tags_labels_and_aliases():
    config = parse_label_config(CONFIG)
    assert (config.image_name, config.image_value_key, config.prompt_name) == ("img", "photo", "prompt")
    assert config.rectangle.name == "box" and config.brush.name == "mask"
    assert config.labels == ("Cat", "dog", "red car", "person")
    assert config.aliases == {"puppy": "dog", "hound": "dog"}
    assert config.default_phrases() == ["cat", "dog", "red car", "person", "puppy", "hound"]


@pytest.mark.parametrize("phrase, label", [
    ("puppy", "dog"),           # predicted_values alias first
    ("Hound", "dog"),           # alias, case-insensitive
    ("dog", "dog"),             # exact
    ("cat", "Cat"),             # case-insensitive
    ("a red  car", "red car"),  # best word overlap
    ("car", "red car"),
    ("truck", None),            # nothing fits: dropped
    ("", None),
])
def test_phrase_mapping_order(phrase, label):
    assert parse_label_config(CONFIG).map_phrase(phrase) == label


def test_single_label_config_maps_everything():
    config = parse_label_config('<View><Image name="i" value="$image"/>'
                                '<BrushLabels name="m" toName="i"><Label value="thing"/></BrushLabels></View>')
    assert config.rectangle is None and config.map_phrase("anything at all") == "thing"


@pytest.mark.parametrize("xml, message", [
    ('<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
     "neither <RectangleLabels> nor <BrushLabels>"),
    ('<View><Text name="t" value="$text"/></View>', "no <Image>"),
    ("", "empty"),
    ("<View><Image", "not valid"),
])
def test_unusable_configs_say_what_to_fix(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
