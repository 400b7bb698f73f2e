"""An installed wheel (not only the editable checkout) carries the Hydra configs and composes a job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_install_finds_the_hydra_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("aov_dist-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import aov_dist, aov_dist.config as c\n"
            "from hydra import compose, initialize_config_dir\n"
            "c.register_configs()\n"
            "with initialize_config_dir(config_dir=c.CONF_DIR, version_base='1.3'):\n"
            "    cfg = compose('config', overrides=['experiment=aov_7b_stage2'])\n"
            "print(aov_dist.__file__, c.CONF_DIR, cfg.model.preset, cfg.cluster.nodes)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    package, conf_dir, preset, nodes = out.stdout.split()
    assert package.startswith(str(site)) and conf_dir.startswith(str(site))  # the wheel's copy, not the checkout
    assert (preset, nodes) == ("aov_7b", "8")
