"""Compare two fine-tunes of one base: do their task vectors use the same directions?"""

from _models import workspace

from weightlab.analysis.angles import AnglesOptions, angles
from weightlab.io import open_weights

m = workspace()
base = open_weights(m["base"])
result = angles(open_weights(m["ft_a"]), open_weights(m["ft_b"]), base, AnglesOptions(k=8))
for row in result.to_dict()["summary_by_layer"]:
    print(f"layer {row['layer']}: mean angle {row['mean_angle_deg']:.1f}° over {row['matrices']} matrices")
