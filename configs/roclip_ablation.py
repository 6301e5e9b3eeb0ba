"""RoCLIP's default (gated) variant beside the other variants and one piece at a time, on the `make
demo` data and attacks.

  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --seeds=0,1,2 --workdir=DIR

Every row trains on the same poisoned data from the same seed with the same augmentations as the
fair control (CLIP+aug); docs/roclip.md, section 8 reads the results. Rows named as in `make demo`'s
benchmark are the same runs: with the benchmark's --workdir they are reused, not trained again.
Row names contain no commas (--only splits on them).
"""

from roclip_jax import config_lib

robustness_demo = config_lib.sibling_config(__file__, "robustness_demo")
AUG = {"augment.image": True, "augment.text": True}


def get_config(arg=None):
  c = robustness_demo.get_config(arg)
  gated = dict(AUG, defense="roclip")
  robust = dict(AUG, defense="roclip", **{"roclip.variant": "robust"})
  c.experiment.runs = [
      ("CLIP+aug", dict(AUG, defense="none")),
      ("RoCLIP (paper)", dict(AUG, defense="roclip", **{"roclip.variant": "paper"})),
      ("RoCLIP (default)", gated),
      # Where the gate fails a pair, the image tower's in-modal view: no excuse (the default of issue
      # 22's third step), or a pass rather than the default's excuse.
      ("gated without image evidence", dict(gated, **{"roclip.image_evidence": "none"})),
      ("gated with image evidence as a pass", dict(gated, **{"roclip.image_evidence": "pass"})),
      # A row failure that the comparison of the two contents' pool captions overrules: a pass (with and
      # without the image evidence), or an excuse.
      ("gated comparing contents", dict(gated, **{"roclip.content_evidence": "pass"})),
      (
          "gated comparing contents without image evidence",
          dict(gated, **{"roclip.content_evidence": "pass", "roclip.image_evidence": "none"}),
      ),
      ("gated with contents as an excuse", dict(gated, **{"roclip.content_evidence": "excuse"})),
      # The views the gate judges by: the un-augmented example (CLIP's eval crop, the caption before
      # EDA), or only the caption before EDA, rather than the augmented views it trains on.
      ("gated judging the plain views", dict(gated, **{"roclip.gate_views": "plain"})),
      ("gated judging the captions before EDA", dict(gated, **{"roclip.gate_views": "plain_text"})),
      # The failures of a pair's peers are no excuse (a failing pair is distrusted whatever its peers do).
      ("gated without the peers", dict(gated, **{"roclip.gate_peers": False})),
      # ... and untrusted pairs stay negatives for the others: the default before issue 22's third step.
      (
          "gated without the peers or leaving out",
          dict(gated, **{"roclip.gate_peers": False, "roclip.drop_untrusted": False}),
      ),
      # The previous row with its lookup over a pool of 20% of the data rather than 2% (one batch here).
      ("gated without the peers with pool 1024", dict(gated, **{"roclip.gate_peers": False, "roclip.pool_size": 1024})),
      # Each pair's positive decided by this step's gate alone, not by its example's majority.
      ("gated without the memory", dict(gated, **{"roclip.gate_memory": False})),
      # The gate acting from its first epoch whatever the share of the batch that passes.
      ("gated without the quorum", dict(gated, **{"roclip.gate_quorum": 0.0})),
      # The gate and matching epochs (the robust schedule: from the middle of the run).
      ("gated with matching epochs", dict(gated, **{"roclip.first_epoch": 8})),
      # Issue 22's first fix: matching epochs from the middle of the run with content targets and CSLS.
      ("robust (matching from mid-run)", robust),
      ("robust without content targets", dict(robust, **{"roclip.content_targets": False})),
      ("robust with matching from the first epoch after the warm-up", dict(robust, **{"roclip.first_epoch": 4})),
      ("robust without CSLS", dict(robust, **{"roclip.csls_k": 0})),
  ]
  c.experiment.controls = tuple((name, "CLIP+aug") for name, _ in c.experiment.runs[1:])
  return c
