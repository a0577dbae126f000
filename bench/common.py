"""What the benchmark scripts share: naming the machine and the command, and saving the results."""

import json
import platform
import sys
from pathlib import Path

import torch


def cpu_model():
    """The CPU's model name: the same run on another CPU model can round differently, and drift."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def describe_run(script, argv, device):
    """{"device", "torch", "command"}: what every results file records about how it was made."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)"
    command = " ".join([f"python bench/{script}", *(sys.argv[1:] if argv is None else argv)])
    return {"device": name, "torch": torch.__version__, "command": command}


def save_results(out_dir, filename, header, rows):
    """Write header + rows as JSON to out_dir/filename and say where."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
