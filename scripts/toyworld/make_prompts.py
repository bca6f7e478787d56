"""Write the toy prompt sets into src/receler/data/ (deterministic).

python scripts/toyworld/make_prompts.py
"""

from __future__ import annotations

from receler.toyworld.prompts import write_prompt_sets

if __name__ == "__main__":
    for name, path in write_prompt_sets().items():
        n = sum(1 for _ in path.open()) - 1
        print(f"{name}: {path} ({n} rows)")
