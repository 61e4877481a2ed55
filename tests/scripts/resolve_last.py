"""``python resolve_last.py LOCAL MIRROR GO``: wait for the file GO, then look "last" up across a local
directory and a mirror, as each rank's ``ckpt_path="last"`` does before the process group exists; print
``[name, url]`` as JSON."""

import json
import os
import sys
import time

from lightning_ckpt.store.local import LocalStore
from lightning_ckpt.tiers.mirror import Mirror, last_across_tiers

local, mirror, go = sys.argv[1:4]
while not os.path.exists(go):
    time.sleep(0.001)
entry, url = last_across_tiers(LocalStore(local), Mirror(mirror))
print(json.dumps([entry.name if entry else None, url]), flush=True)
