"""The Defense interface: a defense registered from this file trains end to end; gradient accumulation is
exact for every registered defense; the generic step and loop name no defense."""

import ast
import glob
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from roclip_jax import train
from roclip_jax.data import image_ops
from roclip_jax.defenses import base
from roclip_jax.errors import config_error
from tests import helpers
from tests.helpers import REPO


class CountingClip(base.Defense):
  """A toy defense: CLIP with a weighted loss, a device counter of the examples seen, and a text tower
  that is frozen in even epochs (a second step kind)."""

  name = "toy_counting"
  config_block = "toy_counting"

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(loss_weight=1.0))

  @classmethod
  def validate(cls, config, num_batch_shards):
    if config.toy_counting.loss_weight <= 0:
      raise config_error("toy_counting.loss_weight", f"is {config.toy_counting.loss_weight}.", "use a positive weight.")

  def init_state(self, key):
    return {"seen": jnp.zeros((), jnp.int32)}

  def state_shardings(self, mesh):
    return {"seen": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}

  def schedule(self, epoch):
    return base.StepKind("frozen_text", text_grad=False) if epoch % 2 == 0 else base.StepKind("clip")

  def loss(self, kind, z, scalars, state, batch, mesh, pair_loss):
    loss, aux = pair_loss(z["image"], z["text"], scalars)
    return self.config.toy_counting.loss_weight * loss, aux

  def update_state(self, kind, state, z, aux, batch, mesh):
    return {"seen": state["seen"] + batch["id"].shape[0]}

  def update_stats(self, kind, stats, z, aux, batch, step):
    return stats, {"toy/seen_in_batch": jnp.float32(batch["id"].shape[0])}


@pytest.fixture
def toy_defense():
  defenses.register(CountingClip)
  try:
    yield CountingClip
  finally:
    defenses._REGISTRY.pop(CountingClip.name)  # pylint: disable=protected-access


def _tiny_config(demo_root, defense):
  """The training tests' tiny run (`helpers.tiny_config`), two epochs of 3 steps, saved synchronously."""
  return helpers.tiny_config(demo_root, defense, num_epochs=2, **{"checkpoint.async_save": False})


def test_a_defense_registered_in_a_test_file_trains_and_checkpoints(toy_defense, demo_root, tmp_path):
  config = _tiny_config(demo_root, "toy_counting")
  assert config.toy_counting.loss_weight == 1.0  # Its block joined the defaults.
  bad = config.copy_and_resolve_references()
  bad.toy_counting.loss_weight = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"config\.toy_counting\.loss_weight: is -1\.0\. Fix"):
    config_lib.validate(bad)

  out = train.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 6
  run = inspect_lib.load(str(tmp_path))
  assert int(run.state.defense["seen"]) == 6 * 16  # Its own state, updated on device, checkpointed.
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "train"]
  assert [r["mode"] for r in rows] == ["clip"] * 3 + ["frozen_text"] * 3  # Its schedule of step kinds.
  assert all(r["toy/seen_in_batch"] == 16.0 for r in rows)
  # A frozen_text step gives the text tower an exactly zero gradient, so with AdamW's decay off the
  # text tower changes only through momentum from epoch 1: compare with a plain-CLIP run, where it
  # keeps being trained, via the loss: both runs are the same up to step 3.
  plain = _tiny_config(demo_root, "none")
  train.train_and_evaluate(plain, str(tmp_path / "plain"))
  plain_rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "plain")) if r["kind"] == "train"]
  np.testing.assert_allclose([r["loss"] for r in rows[:3]], [r["loss"] for r in plain_rows[:3]], rtol=1e-6)
  assert rows[3]["loss"] != plain_rows[3]["loss"] or rows[4]["loss"] != plain_rows[4]["loss"]


def _accum_config(defense, loss="clip"):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 16
  c.data.batch_size = 32
  c.defense = defense
  c.optim.warmup_steps = 2
  c.roclip.pool_size = 64
  c.safeclip.bank_size = 64
  c.init_from = REPO  # CleanCLIP validates that it starts from something; nothing is loaded here.
  c.mesh = (("data", 4), ("fsdp", 2))
  return c


def _batch(views, seed=0, batch=32, plain_views=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 400, size=(batch, 16)).astype(np.int32)
  tokens[:, 0], tokens[:, 7], tokens[:, 8:] = 49406, 49407, 0
  out = {
      "image": rng.integers(0, 256, size=(batch, 16, 16, 3), dtype=np.uint8),
      "text": tokens,
      "id": rng.choice(64, batch, replace=False).astype(np.int32),
      "label": np.zeros(batch, np.int32),
      "poisoned": (np.arange(batch) % 4 == 0).astype(np.int8),
  }
  if views == 2:
    tokens2 = np.roll(tokens, 1, axis=0)
    out.update(image2=rng.integers(0, 256, size=(batch, 16, 16, 3), dtype=np.uint8), text2=tokens2)
  if plain_views:
    out.update(image_plain=rng.integers(0, 256, size=(batch, 16, 16, 3), dtype=np.uint8), text_plain=tokens[::-1])
  return out


# One step kind per defense. RoCLIP's 'clip' kind is the plain pair loss of ('none', 'clip'); its 'gated'
# kind (the default variant's) looks the pool up inside the accumulated loss; its matching
# step (text tower forward only) is checked with a sharded pool in
# tests/test_sharding.py::test_accumulated_gradient_equals_full_batch_gradient. SafeCLIP's 'safe_split'
# computes both terms of its other two phases (the masked cross-modal loss and the unimodal
# nearest-neighbour losses).
# "roclip+plain": the gate judging the un-augmented views, encoded forward only (evidence views).
KINDS = [
    ("none", "clip"),
    ("roclip", "gated"),
    ("roclip+plain", "gated"),
    ("safeclip", "safe_split"),
    ("cleanclip", "cleanclip"),
]


@pytest.mark.parametrize("defense_name,kind_name", KINDS)
def test_accumulated_gradient_equals_full_batch_for_every_defense(defense_name, kind_name):
  """4 micro-batches vs one batch of 32, through the Defense interface, on a data x fsdp mesh."""
  defense_name, _, plain = defense_name.partition("+")
  config = _accum_config(defense_name)
  if plain:
    config.augment.text = True
    config.roclip.gate_views = "plain"
  config_lib.validate(config, 4)
  mesh = sharding.make_mesh(config.mesh)
  defense = helpers.defense_for(config)
  assert defense.supports_grad_accum
  tx, _ = optim.make_optimizer(config.optim, 10)
  spec = steps.ModelSpec.create(config.model)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = steps.create_train_state(config, mesh, tx, shardings, defense)
  if defense_name == "safeclip":  # Half the examples safe, so both masked losses have rows.
    safe = (np.arange(state.defense.safe.shape[0]) % 2).astype(np.int8)
    state = state.replace(defense=state.defense.replace(safe=jax.device_put(safe, shardings.defense.safe)))
  kind = defense.step_kinds()[kind_name]
  assert kind.evidence_views == (("image_plain", "text_plain") if plain else ())
  batch = sharding.global_batch(_batch(defense.views, plain_views=defense.plain_views(config)), mesh)
  results = []
  for accum in (1, 4):
    c = config.copy_and_resolve_references()
    c.grad_accum_steps = accum
    with jax.set_mesh(mesh):
      loss, aux, grads, _ = jax.jit(
          lambda s, b, c=c: steps.loss_and_grads(s, b, spec=spec, mesh=mesh, config=c, kind=kind, defense=defense)
      )(state, batch)
    results.append((float(loss), jax.device_get(grads), jax.device_get(aux["z"])))
  (l1, g1, z1), (l4, g4, z4) = results
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for key in kind.views + kind.evidence_views:
    np.testing.assert_allclose(z4[key], z1[key], atol=1e-5)
  if plain:  # The evidence views are the model's inference-mode unit embeddings of the plain views.
    model = spec.merge(state.params, state.model_state)
    raw = jax.device_get(batch)
    image = model.encode_image(image_ops.normalize(jnp.asarray(raw["image_plain"])), train=False)
    text = model.encode_text(jnp.asarray(raw["text_plain"]))
    for key, z in (("image_plain", image), ("text_plain", text)):
      z = np.asarray(z, np.float64)
      np.testing.assert_allclose(z1[key], z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
  for path, a in jax.tree_util.tree_flatten_with_path(g1)[0]:
    b = g4
    for k in path:
      b = b[k.key]
    scale = float(np.abs(a).max())
    np.testing.assert_allclose(b, a, atol=1e-4 * scale + 1e-7, err_msg=sharding.path_str(path))
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1["vision_model"])) > 0


def test_steps_and_train_name_no_defense():
  names = [n for n in defenses.names() if n != "none"]
  classes = [defenses.get(n).__name__ for n in defenses.names()]
  pattern = re.compile("|".join(map(re.escape, names + classes)), re.IGNORECASE)
  for module in ("steps.py", "train.py"):
    with open(os.path.join(REPO, "roclip_jax", module)) as f:
      source = f.read().replace("roclip_jax", "")  # The package's own name is not a defense.
    found = sorted({m.group(0) for m in pattern.finditer(source)})
    assert not found, f"roclip_jax/{module} names defenses {found}; move that code into roclip_jax/defenses/."


def _docstrings(tree):
  bodies = [n.body for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
  return {id(b[0].value) for b in bodies if b and isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant)}


def _is_defense_field(node):
  """`x.defense`, or `x.get("defense", ...)`: where a config's defense name is read or written."""
  if isinstance(node, ast.Attribute):
    return node.attr == "defense"
  return (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr == "get"
      and bool(node.args)
      and isinstance(node.args[0], ast.Constant)
      and node.args[0].value == "defense"
  )


def _defense_names_in_code(path, names):
  """(line, name), once each, of every defense name the module's code holds as a string, docstrings
  aside: a name other than 'none' anywhere, and 'none' too where it is compared with or assigned to a
  defense field."""
  tree = ast.parse(open(path).read(), path)
  docstrings = _docstrings(tree)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and node.value in names - {"none"} and id(node) not in docstrings:
      found.append((node.lineno, node.value))
    elif isinstance(node, (ast.Compare, ast.Assign)):
      sides = [node.left, *node.comparators] if isinstance(node, ast.Compare) else [*node.targets, node.value]
      constants = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in names]
      if constants and any(_is_defense_field(s) for s in sides):
        found.extend((node.lineno, value) for value in constants)
  return sorted(set(found))


def test_no_module_outside_defenses_and_configs_names_a_defense():
  """What the tools around the trainer need of a defense comes from its class (`caption_pool`, `fine_tunes`,
  `table_notes`, `name`...), so that a defense can be added, renamed or removed in its own module."""
  names = set(defenses.names())
  package = os.path.join(REPO, "roclip_jax")
  named = []
  for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)):
    if os.path.relpath(path, package).split(os.sep)[0] in ("defenses", "configs"):
      continue
    named.extend(
        f"{os.path.relpath(path, REPO)}:{line}: {value!r}" for line, value in _defense_names_in_code(path, names)
    )
  assert not named, "Code that names a defense (ask its class instead):\n" + "\n".join(named)


def test_the_name_check_finds_what_it_is_for(tmp_path):
  path = tmp_path / "module.py"
  path.write_text('''"""Docstrings may say 'roclip'."""
if config.defense == "roclip": pass
if config.get("defense") != "none": pass
config.defense = "none"
rows = [("safeclip", {})]
x = "none"
''')
  names = {"none", "roclip", "safeclip"}
  assert _defense_names_in_code(str(path), names) == [(2, "roclip"), (3, "none"), (4, "none"), (5, "safeclip")]
