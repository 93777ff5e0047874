"""Config args: strict types, tuples, unknown keys, and every config file."""

import importlib
import pathlib

import pytest

from configs import default
from configs import dicm
from csctr import configlib

CONFIG_FILES = sorted(
    p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem != "__init__")


def test_types_follow_the_default():
  c = default.get_config(
      "attention=cbam,use_image=False,visual_dim=16,mlp_dims=(32,16),"
      "small_channels=[4,8],late_fusion=1,seed=3,data.image_size=24")
  assert c.model.attention == "cbam"
  assert c.model.use_image is False and c.model.late_fusion is True
  assert c.model.visual_dim == 16
  assert c.model.mlp_dims == (32, 16) and c.model.small_channels == (4, 8)
  assert c.seed == 3 and c.data.image_size == 24
  assert default.get_config("mlp_dims=16").model.mlp_dims == (16,)
  assert default.get_config("mlp_dims=()").model.mlp_dims == ()
  # Floats and dotted paths into any section.
  assert default.get_config("optim.lr=1e-3").optim.lr == pytest.approx(1e-3)
  assert default.get_config("mesh.shape=(2,-1)").mesh.shape == (2, -1)


@pytest.mark.parametrize("text,want", [("true", True), ("TRUE", True),
                                       ("1", True), ("False", False),
                                       ("0", False)])
def test_booleans_accept_only_true_false_1_0(text, want):
  assert default.get_config(f"use_image={text}").model.use_image is want


@pytest.mark.parametrize("text", ["yes", "no", "flase", "", "2", "on"])
def test_other_booleans_are_errors(text):
  with pytest.raises(ValueError, match="use_image.*true/false/1/0"):
    default.get_config(f"use_image={text}")


def test_bad_numbers_and_brackets_are_errors():
  with pytest.raises(ValueError, match="visual_dim='eight'.*int"):
    default.get_config("visual_dim=eight")
  with pytest.raises(ValueError, match="mlp_dims.*int"):
    default.get_config("mlp_dims=(16,x)")
  with pytest.raises(ValueError, match="unbalanced"):
    default.get_config("mlp_dims=(16,8")


def test_unknown_key_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown config arg 'atention'") as e:
    default.get_config("atention=cbam")
  assert "attention" in str(e.value) and "data.image_size" in str(e.value)


def test_repeated_key_is_an_error():
  with pytest.raises(ValueError, match="twice"):
    default.get_config("head=dnn,head=lr")
  with pytest.raises(ValueError, match="twice"):
    default.get_config("head=dnn,model.head=lr")


def test_bare_name_switches_a_boolean_on():
  assert default.get_config("late_fusion").model.late_fusion is True


def test_arg_wins_over_the_config_file():
  assert dicm.get_config().model.behavior_pooling == "attentive"
  assert dicm.get_config("behavior_pooling=sum").model.behavior_pooling == "sum"
  assert dicm.get_config("data.num_behaviors=2").data.num_behaviors == 2


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_takes_args(name):
  module = importlib.import_module(f"configs.{name}")
  base = module.get_config()
  c = module.get_config("attention=se,seed=7")
  assert (c.model.attention, c.seed) == ("se", 7)
  # Nothing else moved.
  c.model.attention, c.seed = base.model.attention, base.seed
  assert c.to_dict() == base.to_dict()


def test_parse_arg_like_big_vision():
  args = configlib.parse_arg("res=64,runlocal=1,dims=(1,2)", res=224,
                             runlocal=False, dims=(3,), name="x")
  assert args.to_dict() == {"res": 64, "runlocal": True, "dims": (1, 2),
                            "name": "x"}
  assert configlib.parse_arg(None, res=224).res == 224
  with pytest.raises(ValueError, match="valid keys: res"):
    configlib.parse_arg("resolution=64", res=224)
