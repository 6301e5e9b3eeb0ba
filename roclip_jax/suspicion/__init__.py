"""The poison-suspicion report: rank a run's training examples by how suspicious they look.

`build_report(workdir)` loads the run's latest checkpoint, rebuilds its (poisoned) training source
exactly as the trainer did (same config, same poison seed), encodes every training example with the
eval preprocessing (the backdoor trigger stamped on backdoored records, as the trainer saw them, but
no augmentation), scores it and writes the ranked CSV; `python -m roclip_jax.experiments.suspicion`
is its command line. By job:

* `embedding`: the training set rebuilt and encoded in one streaming pass;
* `neighbors`: the blocked top-k search on device, and the local outlier scores (LOF);
* `scores`: every score of an example (each defined in its docstring);
* `metrics`: precision@k, recall@k and AUROC against the injected poisons;
* `report`: the report itself, the CSV and its metrics.

How it scales (N training examples, d embedding size, M pool rows, B = `block_size`): host memory is
O(N d) plus the captions, device memory the keys of a search plus one [B, B] block; no [N, N] or
[N, M] array exists anywhere (each module's docstring says how).
"""

# The report's public names, as `suspicion.<name>` (the scale benchmarks and tests use them).
from roclip_jax.suspicion.metrics import auroc
from roclip_jax.suspicion.metrics import precision_recall_at_k
from roclip_jax.suspicion.metrics import rank_and_evaluate
from roclip_jax.suspicion.neighbors import local_outlier_scores
from roclip_jax.suspicion.neighbors import nearest_neighbors
from roclip_jax.suspicion.report import build_report
from roclip_jax.suspicion.report import format_metrics
from roclip_jax.suspicion.scores import SCORES
from roclip_jax.suspicion.scores import score_examples
