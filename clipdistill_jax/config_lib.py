"""Every config knob, named in one place. configs/*.py start here and change what they need.

Field by field:
  mode               'train' (one run), 'experiment' (teacher / distilled / no-teacher table;
                     experiment.* in clipdistill_jax/experiment.py) or 'ablation' (recipes x
                     step budgets x seeds against the no-teacher student; ablation.*)
  seed               the student's init; also the data order unless data.seed is set
  tokenizer          a directory with CLIP tokenizer files; None = the packaged CLIP BPE.
                     Teacher and student share the tokenizer and the image transforms: a
                     student is distilled on exactly the inputs the teacher sees.
  teacher.source     HF hub id or local directory (load_pretrained); None = no teacher (on
                     the command line: --config.teacher.source=None, =none or =)
  teacher.dtype      'float32' | 'bfloat16'. A frozen bf16 teacher halves its memory and, where
                     matmul units take bf16 natively (TPU; NVIDIA GPUs since Ampere), its
                     time. On a CPU it costs time: XLA:CPU ran the B/32 teacher in bf16 at
                     0.39x the fp32 speed on an AVX-512-BF16 EPYC (scripts/benchmark.py,
                     batch 32). The benchmark warns when a bf16 variant is slower than fp32
                     on the device it ran on: measure before choosing it
  teacher.cache_dir  None = run the teacher live; a directory written by
                     `python -m clipdistill_jax.teacher_cache` = read its cached embeddings
                     (embedding losses only: feature, fd, icl, logit_kl, contrastive; random
                     augmentation only with a multi-view cache, --views K / data.num_views)
  student.arch       'article' | 'teacher' | 'custom' (widths in student.custom) | 'file'
                     (an HF config.json); without a teacher, shapes start from student.base
                     ('vit_b32' | 'tiny') and student.image_size / patch_size / context_length
  student.init       'random' (HF's init) | 'inherit' (weights cut from the teacher)
  student.dtype      'float32' | 'bfloat16': the student's compute dtype (mixed precision: its
                     params, gradients and optimizer state stay fp32; the loss lands within
                     bf16 rounding, ~1%, of fp32's). Pays and costs as teacher.dtype does
  student.remat_policy 'none' | 'full' | a jax.checkpoint_policies name ('dots_saveable',
                     ...): recompute each encoder layer's activations in the backward pass
                     (less activation memory for a larger batch; 'full' costs one more
                     student forward)
  loss.recipe        None (loss.weights as written) or a named recipe from recipes.py
                     ('article', 'clip_kd', 'affinity', ...): it sets the loss fields and
                     student.init (recipes.apply_recipe, before anything else runs)
  loss.weights       feature / fd / icl / hidden / logit_kl / attention / contrastive
                     (0 = off; losses.py documents each and its source)
  loss.teacher_logit_scale  None = the teacher's own; a number = the teacher's logits for
                     logit_kl recomputed at that scale (MobileCLIP tunes it: 100, 70, 60)
  loss.embed_projector 'auto' (embedding losses in the student's own space when its
                     projection_dim equals the teacher's, else through a linear projector)
                     | 'linear' (always through one)
  loss.icl_logit_scale_init  ICL's learnable logit scale starts here (CLIP-KD: 1/0.07)
  loss.hidden_layers teacher layers whose hidden states are distilled ('4,8,12'), 'uniform',
                     'none', or student:teacher pairs ('3:4,8:12'); attention_layers likewise
  optim.*            AdamW, schedule, clipping, accumulation, logit-scale clamp
  train.*            steps, global batch, logging / checkpoint intervals
  data.*             see clipdistill_jax/data/defaults.py; data.seed None (the default) =
                     config.seed, so one seed changes init and data order together
  evals              evaluators run during training, by name: 'zero_shot', 'agreement'
                     (with the teacher), 'retrieval'; 'name@STEPS' sets its own interval
  eval.every         steps between evaluations (0: none during training)
  eval.zero_shot     zero-shot sets: tfds names, 'folder:PATH', 'synthetic' (the first is the
                     results table's); eval.zero_shot_split their split
  eval.retrieval     the results table measures image<->text retrieval on data.eval_split
  eval.stats_repeats timed runs per latency figure of the results table
  mesh.*             device mesh shape over ('data', 'fsdp', 'tensor') and logical-axis rules
"""

from __future__ import annotations

import ml_collections

from clipdistill_jax import losses, sharding
from clipdistill_jax.data import defaults

TEACHER_HUB_ID = "openai/clip-vit-base-patch32"


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0
  c.tokenizer = ml_collections.config_dict.placeholder(str)
  c.distributed = "auto"

  c.teacher = ml_collections.ConfigDict(dict(
      source=ml_collections.config_dict.placeholder(str), dtype="float32", allow_pickle=False,
      cache_dir=ml_collections.config_dict.placeholder(str)))
  c.teacher.source = TEACHER_HUB_ID
  c.student = ml_collections.ConfigDict(dict(
      arch="article", init="random", dtype="float32", remat_policy="none",
      file=ml_collections.config_dict.placeholder(str), base="vit_b32",
      image_size=ml_collections.config_dict.placeholder(int),
      patch_size=ml_collections.config_dict.placeholder(int),
      context_length=ml_collections.config_dict.placeholder(int),
      inherit_vision_layers=ml_collections.config_dict.placeholder(tuple),
      inherit_text_layers=ml_collections.config_dict.placeholder(tuple),
      custom=dict(projection_dim=256, text_hidden_size=384, text_intermediate_size=1536,
                  text_layers=8, text_heads=6, vision_hidden_size=512,
                  vision_intermediate_size=2048, vision_layers=8, vision_heads=8)))

  # The article's multi-task loss: features 0.7 (split evenly between the final embeddings
  # and the hidden states at teacher layers [4, 8, 12]), attention 0.2 (its loss class's
  # beta; the YAML's 0.3 would make the weights sum past 1), contrastive 0.1, plus the KL of
  # its FeatureDistillationLoss at temperature 3.
  c.loss = ml_collections.ConfigDict(dict(
      recipe=ml_collections.config_dict.placeholder(str),
      weights=dict(feature=0.35, fd=0.0, icl=0.0, hidden=0.35, logit_kl=0.5, attention=0.2,
                   contrastive=0.1),
      temperature=3.0, hidden_layers="4,8,12", attention_layers="uniform",
      teacher_logit_scale=ml_collections.config_dict.placeholder(float),
      embed_projector="auto", icl_logit_scale_init=losses.ICL_LOGIT_SCALE_INIT))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-5, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
      schedule="warmup_cosine", warmup_steps=1000, end_lr_ratio=0.0, grad_clip_norm=1.0,
      grad_accum_steps=1, max_logit_scale=100.0))

  # log_every: metrics (means over the interval, kept on the devices) are fetched, and the
  # NaN/inf guard read, every log_every steps; prefetch: batches placed on the mesh ahead
  # of the step that trains on them (train_loop.py; data.prefetch is tf.data's, on the host).
  c.train = ml_collections.ConfigDict(dict(
      total_steps=50_000, batch_size=64, log_every=50, checkpoint_every=1000,
      keep_checkpoints=3, async_checkpoints=True, prefetch=2))

  c.data = defaults.default_data_config()
  c.data.update(dict(source="tfds", name="coco_captions", split="train", eval_split="val"))
  c.data.seed = ml_collections.config_dict.placeholder(int)  # None: config.seed (resolve())

  # The evaluators the trainer runs (eval/evaluators.py: 'zero_shot', 'agreement',
  # 'retrieval'), each every eval.every steps or 'name@STEPS'; built before step 1.
  c.evals = ("zero_shot",)
  c.eval = ml_collections.ConfigDict(dict(
      every=5000, zero_shot=("cifar10",), zero_shot_split="test",
      # None (each dataset's own), a set name, a '{}' template or a list of them: any type
      # (object), so that a config file's tuple and a command line's "('a {}.', 'b {}.')"
      # both arrive as lists; checked before training (eval.prompts.eval_templates)
      templates=ml_collections.config_dict.placeholder(object), max_examples=10_000,
      batch_size=256, retrieval=False, stats_repeats=5))

  # experiment mode: teacher_steps > 0 first trains a teacher of shape teacher_arch (the
  # fields of student.custom; default ViT-B/32's widths) on the data (the offline demo);
  # 0 uses teacher.source as it is.
  c.experiment = ml_collections.ConfigDict(dict(
      teacher_steps=0, teacher_lr=1e-3,
      teacher_arch=dict(projection_dim=512, text_hidden_size=512, text_intermediate_size=2048,
                        text_layers=12, text_heads=8, vision_hidden_size=768,
                        vision_intermediate_size=3072, vision_layers=12, vision_heads=12)))

  # ablation mode (ablation.py): every recipe x steps x seed ('recipe@STEPS': that budget
  # only), plus the no-teacher student at every baseline_steps (empty: ablation.steps), one
  # teacher for all.
  c.ablation = ml_collections.ConfigDict(dict(
      recipes=("article", "clip_kd", "affinity"), steps=(500,), seeds=(0, 1, 2),
      baseline_steps=()))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1), axes=sharding.MESH_AXES,
      rules=tuple((name, axes) for name, axes in sharding.DEFAULT_RULES)))
  # Locked: a config file or flag that sets a field this function does not define (a typo)
  # is refused with the closest valid name instead of being silently ignored.
  c.lock()
  return c


# String fields where None means "none of it"; the command line can only give strings, so
# 'None', 'none' and '' mean None there (`--config.teacher.source=None`: no teacher).
OPTIONAL_STRINGS = ("tokenizer", "teacher.source", "teacher.cache_dir", "student.file",
                    "loss.recipe", "eval.templates", "data.name", "data.data_dir",
                    "data.path", "data.eval_path")
NONE_STRINGS = ("None", "none", "")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the command line's conventions in place, idempotently; returns `config`.

  OPTIONAL_STRINGS given as 'None' / 'none' / '' become None; data.seed None becomes
  config.seed (one seed sets init and data order unless data.seed is given).
  """
  for dotted in OPTIONAL_STRINGS:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if isinstance(node.get(leaf), str) and node[leaf].strip() in NONE_STRINGS:
      node[leaf] = None
  if config.data.get("seed") is None:
    config.data.seed = config.seed
  return config
