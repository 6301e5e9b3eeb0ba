"""No defense: plain CLIP training (`config.defense = 'none'`), the control every defense is compared with.

Everything it does is `base.Defense`'s default: one step kind, the configured
pair loss (CLIP's InfoNCE or SigLIP's sigmoid loss) on each image and its own
caption, no state.
"""

from __future__ import annotations

from roclip_jax.defenses import base


class PlainClip(base.Defense):
  name = "none"
