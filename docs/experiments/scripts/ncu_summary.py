"""Summarise `ncu --csv --page raw --print-units base` output (ns, bytes)."""

import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
head = rows[start]
col = {name: head.index(name) for name in head}
for r in rows[start + 2 :]:
    if len(r) != len(head):
        continue
    name = r[col["Kernel Name"]][:70]
    t = float(r[col["gpu__time_duration.sum"]].replace(",", ""))  # ns
    rd = float(r[col["dram__bytes_read.sum"]].replace(",", ""))
    wr = float(r[col["dram__bytes_write.sum"]].replace(",", ""))
    if t > float(sys.argv[2] if len(sys.argv) > 2 else 5000):  # skip tiny kernels
        gb = (rd + wr) / 1e9
        print(f"{t / 1e3:9.1f} us  {gb:7.3f} GB  {gb / t * 1e3:6.2f} TB/s  {name}")
