"""``python -m minipar.bench --validate``: the pieces that need no timing, and one tiny real run.

Timings are never asserted (the machine is shared and noisy); what is checked is that the
layouts are the ones the issue asks for, that the runs train the very model the cost model
predicts, that the hardware JSON carries every measured number into the time model and the
simulate CLI, and that the report says PASS exactly when a prediction is within 25%.
"""

import io
import json
from contextlib import redirect_stdout
from dataclasses import asdict, replace

import pytest
from cli_util import run
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.bench import validate as bv
from minipar import simulate
from minipar.bench.probe import Workload
from minipar.config import ParallelConfig
from minipar.sim import kernels as K
from minipar.sim.costmodel import Workload as SimWorkload
from minipar.sim.hardware import Hardware
from minipar.sim import comm_volume as cv
from minipar.sim.timing import (
    chunk_costs, estimate, first_touch_time, fresh_output_time, predict_step_time,
)

TINY = Workload(layers=2, d_model=16, heads=2, seq_len=8, vocab=256, batch_size=8)
FAMILIES = ("layernorm", "residual", "gelu", "softmax", "embedding", "cross_entropy",
            "optimizer")


def hardware_json(path, **over) -> str:
    """A hardware file shaped as ``measure_hardware`` writes it (made-up numbers)."""
    data = {"gemm_flops": 8e10, "bmm_flops": 5e10, "mem_bytes_per_s": 4e10,
            "elem_bytes_per_s": {f: 1e9 * (i + 1) for i, f in enumerate(FAMILIES)},
            "first_touch_bytes_per_s": 1.2e9, "op_latency_s": 6e-6, "cores": 2,
            "blas_threads": 1, "workload": asdict(TINY), "all_busy_speed": 0.8,
            "ranks": {"2": {"ranks": 2, "latency_s": 5e-6, "allreduce_bytes_per_s": 2e9},
                      "4": {"ranks": 4, "latency_s": 4e-5, "allreduce_bytes_per_s": 1e9}},
            "allreduce_bytes_per_s": 2e9, "latency_s": 5e-6}
    data.update(over)
    path.write_text(json.dumps(data))
    return str(path)


def test_layouts_cover_one_two_four_ranks_and_dp_tp_pp():
    assert {x.ranks for x in bv.LAYOUTS} == {1, 2, 4}
    assert len({x.name for x in bv.LAYOUTS}) == len(bv.LAYOUTS)
    kinds = {(x.dp > 1, x.tp > 1, x.pp > 1) for x in bv.LAYOUTS}
    for kind in ((True, False, False), (False, True, False), (False, False, True),
                 (True, True, False), (True, False, True)):
        assert kind in kinds
    work = Workload()
    for x in bv.LAYOUTS:  # every layout runs the default workload as it stands
        x.parallel().validate(work.model(), world_size=x.ranks, batch_size=work.batch_size)
        assert x.pp == 1 or x.microbatches == 4


def test_runs_train_the_model_the_cost_model_predicts(tmp_path):
    from minipar.train.cli import build_parser, make_configs
    data = bv.write_text(str(tmp_path / "text.txt"))
    for work in (TINY, Workload()):
        for x in bv.LAYOUTS:
            argv = work.train_args(data, 3, str(tmp_path / "s.json"))[2:] + x.flags()
            assert "--threads" in argv and argv[argv.index("--threads") + 1] == "1"
            cfg, par, _, _ = make_configs(build_parser().parse_args(argv), x.ranks)
            assert cfg == work.model()
            assert par == x.parallel()


@settings(max_examples=25, deadline=None)
@given(measured=st.floats(0.01, 10), ratio=st.floats(0.2, 3))
def test_row_passes_exactly_within_the_target(measured, ratio):
    r = bv.row(bv.LAYOUTS[0], {"measured_s": measured, "wall_s": measured}, measured * ratio)
    assert r["ratio"] == pytest.approx(ratio)
    assert r["within_target"] == (abs(r["ratio"] - 1) <= bv.TARGET)


def test_table_and_json():
    cases = [(0.40, 0.40), (0.20, 0.26), (0.20, 0.148), (0.30, 0.231)]  # 1.0, 1.3, .74, .77
    rows = [bv.row(x, {"measured_s": m, "wall_s": 2 * m, "faulted_bytes": 7e6}, p, 9e6)
            for x, (m, p) in zip(bv.LAYOUTS, cases)]
    lines = bv.table(rows).splitlines()
    assert "measured" in lines[0] and "predicted" in lines[0] and "25%" in lines[0]
    for line, x, verdict in zip(lines[1:], bv.LAYOUTS, ("PASS", "MISS", "MISS", "PASS")):
        assert line.startswith(x.name) and line.split()[-3] == verdict
        assert line.split()[-2:] == ["7", "(9)"]  # MB faulted per rank per step (model)
    assert "400 ms" in lines[1] and "800 ms" in lines[1]  # measured and wall columns
    assert lines[-1].startswith("2 of 4 predictions within 25%")
    back = json.loads(json.dumps(rows))
    assert [r["layout"] for r in back] == [x.name for x in bv.LAYOUTS[:4]]
    assert {"ranks", "dp", "tp", "pp", "measured_s", "wall_s", "faulted_bytes", "predicted_s",
            "modelled_fresh_bytes", "ratio", "within_target"} <= set(back[0])


def test_hardware_json_round_trip(tmp_path):
    path = hardware_json(tmp_path / "hw.json")
    hw = Hardware.from_bench_json(path)
    assert hw.cores == 2 and hw.bmm_flops == 5e10 and hw.first_touch_bw == 1.2e9
    assert hw.elem_bw == {f: 1e9 * (i + 1) for i, f in enumerate(FAMILIES)}
    assert hw.links_by_ranks == {2: (2e9, 5e-6), 4: (1e9, 4e-5)}
    two, four = hw.shared_by(2), hw.shared_by(4)
    # 2 ranks on 2 cores: each a core, at its speed with both busy; the 2-rank links
    assert two.flops("fp32") == pytest.approx(0.8 * 8e10) and two.intra_bw == 2e9
    assert two.elem_bw == pytest.approx({k: 0.8 * v for k, v in hw.elem_bw.items()})
    # 4 ranks on 2 cores: half of that, twice the overhead, the 4-rank links
    assert four.flops("fp32") == pytest.approx(0.4 * 8e10)
    assert four.bmm_flops == pytest.approx(0.4 * 5e10)
    assert four.elem_bw["gelu"] == pytest.approx(0.4 * hw.elem_bw["gelu"])
    assert four.first_touch_bw == pytest.approx(0.4 * 1.2e9)
    assert four.kernel_latency == pytest.approx(hw.kernel_latency / 0.4)
    assert hw.shared_by(1) is hw
    assert (four.intra_bw, four.intra_latency) == (1e9, 4e-5) == (four.inter_bw,
                                                                  four.inter_latency)
    # the simulate CLI reads the same file and predicts what the time model predicts
    out = io.StringIO()
    with redirect_stdout(out):
        rc = simulate.main(["--model", "gpt3-125m", "--layers", "2", "--d-model", "16",
                            "--heads", "2", "--seq-len", "8", "--vocab", "256", "--dp", "2",
                            "--global-batch", "8", "--dtype", "fp32", "--hardware",
                            "this-machine", "--hardware-file", path, "--json"])
    assert rc == 0
    got = json.loads(out.getvalue())
    # two ranks (--dp 2) share this one machine, and the report says so
    assert got["hardware"] == "this-machine/2" and got["step_time_s"] > 0


def test_measured_parameters_enter_the_time_model(tmp_path):
    plain = Hardware.from_bench_json(hardware_json(
        tmp_path / "plain.json", bmm_flops=0, elem_bytes_per_s={}, first_touch_bytes_per_s=0))
    hw = Hardware.from_bench_json(hardware_json(tmp_path / "hw.json"))
    model, par = TINY.model(), ParallelConfig(dp=1)
    work = SimWorkload(global_batch=8, microbatch_size=8, dtype="fp32", dropout=False,
                       scatter_gather=False)
    # each elementwise family at its own rate, attention's products at the batched rate
    for k in K.block_forward(model, 8, 1, False, 4, False):
        t = K.kernel_time(k, hw, "fp32") - hw.kernel_latency
        if k.cls == "elem":
            assert t == pytest.approx(k.nbytes / hw.elem_bw[k.family])
        elif k.cls == "gemm":
            assert t == pytest.approx(max(k.flops / 5e10, k.nbytes / hw.mem_bw))
    assert K.optimizer_time(1000, hw, 4) == pytest.approx(
        28 * 1000 / hw.elem_bw["optimizer"] + 4 * hw.kernel_latency)
    # first touch: the forward pays for the activations it keeps, at the measured rate
    touched = replace(plain, first_touch_bw=hw.first_touch_bw)
    extra = chunk_costs(model, par, work, touched, 0)[0].fwd - chunk_costs(
        model, par, work, plain, 0)[0].fwd
    kinds = ["block"] * model.n_layers + ["head"]
    assert extra == pytest.approx(sum(first_touch_time(model, par, work, touched, u)
                                      for u in kinds))
    assert first_touch_time(model, par, work, plain, "block") == 0.0
    # a tp forward's collectives return fresh arrays: those bytes are first touches too
    tp2 = ParallelConfig(tp=2)
    outs = sum(c.nbytes for kind in kinds + ["embed"] for c in {
        "block": cv.block_tp, "embed": cv.embed_tp, "head": cv.head_tp}[kind](
            model, tp2, 8, 4, False))
    assert outs > 0 and fresh_output_time(cv.block_tp(model, tp2, 8, 4, False), tp2,
                                          touched) == pytest.approx(2 * 8 * 8 * 16 * 4 / 1.2e9)
    layout = bv.Layout("tp2", tp=2)
    assert bv.modelled_fresh_bytes(layout, TINY, touched) == pytest.approx(outs + sum(
        first_touch_time(model, tp2, work, touched, u) * 1.2e9 for u in kinds))
    assert bv.modelled_fresh_bytes(layout, TINY, plain) == 0.0
    assert predict_step_time(model, par, 8, touched) > predict_step_time(model, par, 8, plain)
    # a GPU preset has none of these: its estimate is the one test_costmodel checks exactly
    from minipar.sim.hardware import A100_80GB
    assert not A100_80GB.elem_bw and not A100_80GB.bmm_flops and not A100_80GB.first_touch_bw
    assert A100_80GB.shared_by(1) is A100_80GB
    assert estimate(model, par, replace(work, dtype="bf16"), A100_80GB).step_time_s > 0


def test_every_zero_stage_predicts_on_this_machine(tmp_path):
    hw = Hardware.from_bench_json(hardware_json(tmp_path / "hw.json")).shared_by(4)
    times = [predict_step_time(TINY.model(), ParallelConfig(dp=4, zero=z), 8, hw)
             for z in (0, 1, 2, 3)]
    assert all(t > 0 for t in times)


def test_bad_flags_are_one_line_errors(capsys):
    from minipar.bench import step as bench
    assert bench.main(["--validate", "--layouts", "nope"]) == 2
    assert bench.main(["--validate", "--heads", "5"]) == 2
    assert bench.main(["--validate", "--hardware-file", "/nonexistent.json",
                       "--layouts", "serial"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("minipar.bench: error:") for e in errors)
    assert "nope" in errors[0] and "--heads 5" in errors[1] and "nonexistent" in errors[2]


def test_local_probe_writes_every_rate(tmp_path):
    out = tmp_path / "local.json"
    proc = run(["-m", "minipar.bench.probe", "--local", str(out), "--rounds", "1",
                "--workload", json.dumps(asdict(TINY))], n=1)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "local.json.0").read_text())  # one file per rank
    assert set(data["elem_bytes_per_s"]) == set(FAMILIES)
    for key in ("gemm_flops", "bmm_flops", "mem_bytes_per_s", "op_latency_s", "cores"):
        assert data[key] > 0
    assert data["first_touch_bytes_per_s"] >= 0
    # the same rates twice as fast: the machine runs every process at full speed when busy
    faster = json.loads(json.dumps(data))
    for k in ("gemm_flops", "bmm_flops", "mem_bytes_per_s"):
        faster[k] *= 2
    faster["op_latency_s"] /= 2
    faster["elem_bytes_per_s"] = {k: 2 * v for k, v in data["elem_bytes_per_s"].items()}
    assert bv.all_busy_speed(data, [faster, faster]) == 1.0
    assert bv.all_busy_speed(faster, [data, faster]) == pytest.approx(0.75)


def test_validate_end_to_end(tmp_path):
    """The real command on a reduced layout list and a tiny model: one rank and two."""
    hw = hardware_json(tmp_path / "hw.json")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(TINY).items()]
    proc = run(["-m", "minipar.bench", "--validate", "--hardware-file", hw, "--layouts",
                "serial,dp2", "--steps", "1", "--repeat", "1", "--json", *flags], timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["layout"] for r in report["rows"]] == ["serial", "dp2"]
    for r, x in zip(report["rows"], bv.LAYOUTS):
        assert r["ranks"] == x.ranks
        assert r["predicted_s"] == pytest.approx(
            bv.predict(x, TINY, Hardware.from_bench_json(hw)))
        assert r["measured_s"] == r["measured_s"] and r["wall_s"] == r["wall_s"]  # not nan
    assert report["workload"] == asdict(TINY) and report["target"] == 0.25
