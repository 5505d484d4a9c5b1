"""benchmarks/startup.py without timing anything: the commands it compares and its summary."""

from openelm_mlx.benchmarks import startup


def test_both_commands_ask_for_the_same_generation():
    cmds = startup.commands(startup.DEMO_MODEL, "Hi", 20)
    ours, theirs = cmds["openelm-mlx"], cmds["mlx-lm"]
    assert ours[1:4] == ["-m", "openelm_mlx", "generate"] and theirs[1:4] == ["-m", "mlx_lm", "generate"]
    assert ours[4:] == theirs[4 : len(ours)]  # model, prompt, --max-tokens 20, --temp 0
    assert "--temp" in ours and ours[ours.index("--temp") + 1] == "0"
    assert cmds["floor"][-1] == "import mlx.core"


def test_summary_is_the_median_of_per_trial_ratios():
    def trial(ours, theirs, floor=1.0):
        return {n: {"wall_s": t, "cpu_s": t} for n, t in (("openelm-mlx", ours), ("mlx-lm", theirs), ("floor", floor))}

    results = {"trials": [trial(2, 4), trial(3, 4), trial(9, 10)]}
    startup.summarize(results)
    s = results["summary"]
    assert s["ratio wall_s"]["median"] == 0.75  # 0.5, 0.75, 0.9
    assert s["ratio above floor wall_s"]["median"] == 2 / 3  # 1/3, 2/3, 8/9
    assert s["meets_target"] is False
