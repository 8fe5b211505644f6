"""A benchmark and a cached measurement name the processor: model, cores, the ISA flags that set its speed."""

from tinylm import machine

AMD = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 9R14
flags		: fpu sse4_2 avx f16c fma avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni sha_ni
processor	: 1
model name	: AMD EPYC 9R14
flags		: fpu sse4_2 avx f16c fma avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni sha_ni
"""
INTEL = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ARM = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm bf16\n"


def test_cpu_info_reads_the_model_and_the_isa_flags_that_matter():
    amd = machine.cpu_info(AMD)
    assert amd["model"] == "AMD EPYC 9R14" and amd["cores"] >= 1
    assert {"avx2", "avx512_bf16", "avx512_vnni", "fma"} <= set(amd["flags"])
    assert "sha_ni" not in amd["flags"] and "fpu" not in amd["flags"]  # no bearing on a model's speed
    assert amd["flags"] == sorted(amd["flags"]) and not any(f.startswith("amx") for f in amd["flags"])
    intel = machine.cpu_info(INTEL)
    assert {"amx_bf16", "amx_tile", "amx_int8"} <= set(intel["flags"]) and intel["model"].startswith("Intel")
    arm = machine.cpu_info(ARM)
    assert {"asimd", "asimddp", "sve", "i8mm", "bf16"} <= set(arm["flags"]) and arm["model"]
    assert "avx512_bf16" in machine.cpu_summary(amd) and "AMD EPYC 9R14" in machine.cpu_summary(amd)


def test_the_bench_report_states_the_machine():
    from tinylm.bench import suite

    got = suite.machine()
    assert set(got["cpu"]) == {"model", "cores", "flags"} and got["cpu"] == machine.this_cpu()
    assert "torch" in got["versions"] and got["system"]
