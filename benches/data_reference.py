"""The same data-pipeline stages as `cargo bench --bench data`, the way sd-scripts does them (cv2.imread,
cv2.resize INTER_AREA, centre trim; PIL for image sizes), on the same generated JPEGs.

usage: python data_reference.py target/bench-data-1000   (needs numpy, opencv-python-headless, pillow)
"""
import glob
import math
import sys
import time

import cv2
from PIL import Image

files = sorted(glob.glob(f"{sys.argv[1]}/1_bench/*.jpg"))
cv2.setNumThreads(1)

t = time.perf_counter()
sizes = [Image.open(f).size for f in files]
scan = time.perf_counter() - t

bucket, resized = (576, 448), (597, 448)
t = time.perf_counter()
for f in files:
    img = cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, resized, interpolation=cv2.INTER_AREA)
    x = (resized[0] - bucket[0]) // 2
    img = img[:, x : x + bucket[0]]
load = time.perf_counter() - t

print(f"| stage (Python: PIL + OpenCV {cv2.__version__}, 1 thread) | images | seconds | images/s |")
print("|---|---|---|---|")
print(f"| scan (PIL image sizes) | {len(files)} | {scan:.2f} | {len(files) / scan:.1f} |")
print(f"| decode + resize (INTER_AREA) + trim | {len(files)} | {load:.2f} | {len(files) / load:.1f} |")
