r"""The article's run: distill openai/clip-vit-base-patch32 into its 60M-parameter student.

On a TPU VM (the teacher comes from the Hugging Face hub, data from tfds):

    python -m clipdistill_jax.main --config configs/small.py --workdir /tmp/small

On every host of a pod slice, the same command (jax.distributed connects the hosts):

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command \
      "cd clipdistill_jax && python -m clipdistill_jax.main --config configs/small.py \
       --workdir /mnt/shared/small"

Offline: --config.teacher.source=/path/to/clip-vit-base-patch32 (a directory with
config.json and model.safetensors) and --config.data.data_dir=/path/to/tensorflow_datasets.

mode 'experiment' trains the distilled student and the same student without a teacher
(contrastive only, same steps/data/schedule), then evaluates teacher / distilled /
no-teacher into WORKDIR/report; --config.mode=train runs the distillation alone.

Student (the article's): projection 256; text 384 wide, 1536 MLP, 8 layers, 6 heads;
vision 512 wide, 2048 MLP, 8 layers, 8 heads, patch 32, 224 px: 60,248,193 parameters.
Loss: recipe 'clip_kd_inherit', 98.4% of the teacher on the real-data digits benchmark
(the demo's FD-heavy recipe: 99.6%, with students in the teacher's embedding width; README,
"Ablation"): CLIP-KD's FD + ICL + contrastive, the student's weights cut from the teacher's. The
article's projection (256) differs from the teacher's (512), so FD and ICL act through a
learnable projector; --config.student.arch=custom --config.student.custom.projection_dim=512
distils in the student's own space instead (+229,376 parameters; worth 1.8 points on the
demo). The article's own multi-task loss: --config.loss.recipe=article.
"""

from clipdistill_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.mode = "experiment"
  c.loss.recipe = "clip_kd_inherit"  # sets the loss weights and student.init (recipes.py)

  # config_lib's defaults are the article's: its teacher and student (teacher.source, arch
  # 'article'), batch 64, AdamW lr 2e-5, weight decay 0.01,
  # betas (0.9, 0.999), 1000 warmup steps, 50k steps, temperature 3, layers [4, 8, 12].
  # Data: config_lib's COCO captions (tfds), every caption of an image.
  c.data.caption_key = "captions/text"
  c.eval.update(dict(templates="openai_imagenet", retrieval=True))
  return c
