"""Compare two fine-tunes of one base: do their task vectors use the same directions?"""

from _models import workspace

from weightlab.analysis.angles import AnglesOptions, angles
from weightlab.io import open_weights

m = workspace()
base = open_weights(m["base"])
result = angles(open_weights(m["ft_a"]), open_weights(m["ft_b"]), base, AnglesOptions(k=8))
for row in result.to_dict()["summary_by_layer"]:
    where = f"layer {row['layer']}" if row["layer"] is not None else "outside the layers (embeddings, head)"
    count = f"{row['matrices']} matrix" if row["matrices"] == 1 else f"{row['matrices']} matrices"
    print(f"{where}: mean angle {row['mean_angle_deg']:.1f}° over {count}")
