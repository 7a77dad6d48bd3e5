"""The README's Python blocks run as written (in a fresh interpreter)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:6]] == [
        "Unrolled",
        "Unrolled",
        "Unrolled",
        "Forward",
        "Implicit",
        "Unrolled",
    ]
    flax_name, _, flax_status = lines[6].split()  # the flax inner model
    assert flax_name == "flax" and flax_status == "0"
    assert float(lines[7]) <= 1e-6  # check_hypergradient's relative error
    stochastic = [line.split() for line in lines[8:14]]
    assert [row[0] for row in stochastic] == [
        "NHGD",
        "NHGD",
        "StocBiO",
        "AmIGO",
        "SOBA",
        "SolveAfter",
    ]
    assert all(float(row[1]) < 0.6 for row in stochastic)  # validation NLL, from log 2 = 0.69
    saba = lines[14].split()
    assert saba[0] == "SABA" and float(saba[1]) < 0.6  # on one validation block
    name, best, replaced = lines[15].split()  # the population: 8 members, 2 replaced each time
    assert name == "HPM" and float(best) < 20 and int(replaced) == 2
