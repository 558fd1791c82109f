"""``shard_fused_simpo_model`` shards over a mesh on the device type of the process group's backend (gloo: CPU,
also on a machine with GPUs), or over the mesh the user gives. One process, no torchrun."""
import pytest
import torch
import torch.distributed as dist

from patches import distributed
from patches.distributed import default_mesh, mesh_device_type, shard_fused_simpo_model
from tests.distributed import fsdp2_setup

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


@pytest.fixture
def gloo_group():
    """A one-process gloo group (in-memory store), torn down after the test."""
    assert not dist.is_initialized(), "a process group leaked from another test"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def fully_shard_calls(monkeypatch):
    """Records the keyword arguments of every ``fully_shard`` call of ``patches.distributed``; does not shard."""
    calls = []
    monkeypatch.setattr(distributed, "fully_shard", lambda module, **kwargs: calls.append(kwargs) or module)
    return calls


@pytest.mark.parametrize(
    "backend, device_type",
    [("gloo", "cpu"), ("nccl", "cuda"), ("xccl", "xpu"), ("cpu:gloo,cuda:nccl", "cuda"), ("cpu:gloo", "cpu")],
)
def test_mesh_device_type_follows_the_backend(backend, device_type):
    assert mesh_device_type(backend) == device_type


def test_unknown_backend_asks_for_a_mesh():
    with pytest.raises(ValueError, match=r"'mpi'.*mesh="):
        mesh_device_type("mpi")


def test_gloo_group_is_sharded_on_a_cpu_mesh(gloo_group, monkeypatch):
    """Every FSDP unit gets the CPU mesh (fully_shard's own default is the accelerator, if the machine has one:
    rank 1 of a 2-process gloo run on a 1-GPU machine died with 'invalid device ordinal')."""
    meshes = []
    real_fully_shard = distributed.fully_shard

    def recording_fully_shard(module, **kwargs):
        meshes.append(kwargs["mesh"])
        return real_fully_shard(module, **kwargs)

    monkeypatch.setattr(distributed, "fully_shard", recording_fully_shard)
    model = shard_fused_simpo_model(fsdp2_setup.build_model(tied=True))
    assert len(meshes) == fsdp2_setup.TINY_LLAMA["num_hidden_layers"] + 1
    assert all(mesh is not None and mesh.device_type == "cpu" and mesh.size() == 1 for mesh in meshes), meshes
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    batch = fsdp2_setup.global_batch(n_pairs=1)
    model(**batch).loss.backward()  # the sharded model trains


def test_nccl_group_gets_a_cuda_mesh(gloo_group, monkeypatch, fully_shard_calls):
    """Under nccl the default mesh is CUDA (the mesh itself is not built: this machine may have no GPU)."""
    built = []
    monkeypatch.setattr(dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(distributed, "init_device_mesh", lambda *args, **kwargs: built.append((args, kwargs)) or "mesh")
    shard_fused_simpo_model(fsdp2_setup.build_model(tied=False))
    assert built == [(("cuda", (1,)), dict(mesh_dim_names=None))]
    assert [call["mesh"] for call in fully_shard_calls] == ["mesh"] * (fsdp2_setup.TINY_LLAMA["num_hidden_layers"] + 1)


def test_user_mesh_is_passed_through(monkeypatch, fully_shard_calls):
    """A given mesh reaches every fully_shard call as is, and no default mesh is built (no process group needed)."""
    monkeypatch.setattr(distributed, "default_mesh", lambda *args: pytest.fail("built a default mesh"))
    user_mesh = object()
    shard_fused_simpo_model(fsdp2_setup.build_model(tied=False), mesh=user_mesh)
    assert len(fully_shard_calls) == fsdp2_setup.TINY_LLAMA["num_hidden_layers"] + 1
    assert all(call["mesh"] is user_mesh for call in fully_shard_calls)


def test_default_mesh_without_a_process_group_says_what_to_do():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"init_process_group.*mesh="):
        default_mesh()


def test_default_mesh_names_its_dimension(gloo_group):
    mesh = default_mesh(mesh_dim_names=("dp_shard",))
    assert (mesh.device_type, mesh.mesh_dim_names, mesh.size()) == ("cpu", ("dp_shard",), 1)
