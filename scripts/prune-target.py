"""Keeps the shared cargo target folder (kept between runs, outside the clone) from filling the disk: every
clone of the repository builds its own copies of the workspace's test binaries (cargo keys them by the
clone's path), so old copies pile up. Removes each executable in <target>/release/{deps,examples} that has a newer
build of the same name, and the incremental caches when less than 20 GiB is free. Nothing still in use is
touched: the newest build of every name stays.

usage: prune-target.py TARGET_DIR
"""
import os
import re
import shutil
import sys
from collections import defaultdict

target = sys.argv[1]
for deps in (os.path.join(target, "release", "deps"), os.path.join(target, "release", "examples")):
    if not os.path.isdir(deps):
        continue
    groups = defaultdict(list)
    for name in os.listdir(deps):
        path = os.path.join(deps, name)
        m = re.match(r"^(.*)-([0-9a-f]{16})$", name)
        if m and os.path.isfile(path):
            groups[m.group(1)].append((os.stat(path).st_mtime, path))
    freed = 0
    for builds in groups.values():
        builds.sort(reverse=True)
        for _, path in builds[1:]:
            freed += os.path.getsize(path)
            os.remove(path)
    if freed:
        print(f"[setup] pruned {freed / 2**30:.1f} GiB of superseded test binaries from {deps}")
free = shutil.disk_usage(target if os.path.isdir(target) else "/").free
if free < 20 * 2**30:
    for profile in ("release", "debug"):
        inc = os.path.join(target, profile, "incremental")
        if os.path.isdir(inc):
            shutil.rmtree(inc, ignore_errors=True)
            print(f"[setup] removed {inc} (disk nearly full)")
