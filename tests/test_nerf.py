"""NeRF scenes: the hash-grid encoding, the field and nerfacc volume rendering."""

import math

import numpy as np

import pytest
import torch

from cfd.cameras import look_at, intrinsics_from_fov, Cameras
from cfd.renderers import render
from cfd.scene import HashGrid, HashGridConfig, NeRFConfig, NeRFField
from cfd.scene.hash_grid import hash_encode, hash_grid, level_layout

SMALL = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10,
                       base_resolution=4, max_resolution=32, backend="torch")


def test_hash_grid_layout_follows_the_rules():
    """Per-level scale 2: scales 3, 7, 15, 31; R^3 rounded to 8, capped at 2^10 entries."""
    levels = level_layout(SMALL)
    assert [lv.scale for lv in levels] == [3.0, 7.0, 15.0, 31.0]
    assert [lv.resolution for lv in levels] == [4, 8, 16, 32]
    assert [lv.size for lv in levels] == [64, 512, 1024, 1024]
    assert [lv.offset for lv in levels] == [0, 64, 576, 1600]
    assert [lv.hashed for lv in levels] == [False, False, True, True]
    assert HashGrid(SMALL).params.numel() == (1600 + 1024) * 2
    # official CFD: 16 levels x 2, 2^20 entries, base 16, max 4096 -> 4096 on the finest level
    official = HashGridConfig(n_levels=16, log2_hashmap_size=20, max_resolution=4096)
    assert level_layout(official)[-1].resolution == 4096


def reference_encoding(grid: HashGrid, point):
    """One point, straight from the rules with Python integers (32-bit hash, tcnn's stride
    loop)."""
    table = grid.params.detach().double().view(-1, grid.cfg.n_features_per_level)
    out = []
    for level in grid.levels:
        position = [c * level.scale + 0.5 for c in point]
        cell = [math.floor(p) for p in position]
        frac = [p - c for p, c in zip(position, cell)]
        value = torch.zeros(table.shape[1], dtype=torch.float64)
        for corner in range(8):
            vertex = [cell[d] + ((corner >> d) & 1) for d in range(3)]
            weight = 1.0
            for d in range(3):
                weight *= frac[d] if (corner >> d) & 1 else 1 - frac[d]
            index, stride = 0, 1
            for d in range(3):
                if stride > level.size:
                    break
                index += vertex[d] * stride
                stride *= level.resolution
            if level.size < stride:
                index = 0
                for d, prime in enumerate((1, 2654435761, 805459861)):
                    index ^= (vertex[d] * prime) & 0xFFFFFFFF
            value += weight * table[level.offset + index % level.size]
        out.append(value)
    return torch.cat(out)


def test_hash_grid_matches_a_direct_reference():
    grid = HashGrid(SMALL, torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(1))
    points = torch.cat([torch.rand(20, 3, generator=torch.Generator().manual_seed(2)),
                        torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.0, 1.0]])])
    got = grid(points).double()
    want = torch.stack([reference_encoding(grid, p.double().tolist()) for p in points])
    assert torch.allclose(got, want, atol=1e-5)


def test_hash_grid_gradients_are_exact():
    grid = HashGrid(SMALL, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(1))
    points = (0.05 + 0.9 * torch.rand(6, 3, generator=torch.Generator().manual_seed(3))).double()
    points.requires_grad_(True)
    params = grid.params.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, x: hash_encode(x, p, grid.levels, 2),
                                    (params, points))


def test_tcnn_backend_needs_cuda_and_says_how():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="tiny-cuda-nn.*backend=torch"):
        hash_grid(HashGridConfig(backend="tcnn"), "cpu")
    assert isinstance(hash_grid(HashGridConfig(), "cpu"), HashGrid)  # auto -> torch on CPU


class Slab(torch.nn.Module):
    """Density ``sigma`` where ``|x| < half``, colour ``rgb``: a uniform slab facing +x."""

    def __init__(self, sigma, half, rgb, radius=1.0):
        super().__init__()
        self.sigma, self.half, self.rgb = sigma, half, torch.tensor(rgb)
        self.cfg = NeRFConfig(radius=radius)

    def query(self, points):
        density = torch.where(points[:, 0].abs() < self.half, self.sigma, 0.0)
        return density, self.rgb.expand(points.shape[0], 3)


def camera_on_x(distance=3.0, size=5):
    eye = torch.tensor([[distance, 0.0, 0.0]])
    return Cameras(look_at(eye, torch.zeros(1, 3)),
                   intrinsics_from_fov(torch.tensor([30.0]), size, size), size, size)


def test_volume_rendering_of_a_uniform_slab():
    """The centre ray crosses 0.5 of density 2: opacity 1 - exp(-1), the analytic expected
    depth, the slab's colour over the background by that opacity."""
    from cfd.renderers.volume import render_field

    sigma, half, distance = 2.0, 0.25, 3.0
    out = render_field(Slab(sigma, half, [0.2, 0.4, 0.6]), camera_on_x(distance),
                       n_samples=2048, background=torch.tensor([[1.0, 1.0, 1.0]]))
    L = 2 * half
    alpha = 1 - math.exp(-sigma * L)
    depth = distance - half + 1 / sigma - L * math.exp(-sigma * L) / alpha
    centre = (0, 2, 2)
    assert out.alpha[centre].item() == pytest.approx(alpha, abs=2e-3)
    assert out.depth[centre].item() == pytest.approx(depth, abs=2e-3)
    want = alpha * torch.tensor([0.2, 0.4, 0.6]) + (1 - alpha)
    assert torch.allclose(out.rgb[centre], want, atol=2e-3)
    # a corner ray crosses the slab over the same camera-z range but |d| times farther
    stretch = camera_on_x(distance).ray_directions()[0, 0, 0].norm().item()
    assert stretch > 1.03  # large enough for the tolerance below to tell
    corner_alpha = 1 - math.exp(-sigma * L * stretch)
    assert out.alpha[0, 0, 0, 0].item() == pytest.approx(corner_alpha, abs=2e-3)
    assert out.depth[0, 0, 0, 0].item() == pytest.approx(
        distance - half + 1 / (sigma * stretch)
        - L * math.exp(-sigma * L * stretch) / corner_alpha, abs=2e-3)


def test_rays_that_miss_the_box_are_empty():
    from cfd.renderers.volume import render_field

    out = render_field(Slab(50.0, 0.1, [1.0, 0.0, 0.0], radius=0.1), camera_on_x(3.0, size=9),
                       n_samples=64)
    assert out.alpha[0, 0, 0, 0] == 0 and out.depth[0, 0, 0, 0] == 0
    assert out.alpha[0, 4, 4, 0] > 0.99


def test_nerf_field_starts_as_a_blob_and_learns():
    """At initialisation the blob is opaque in the middle and empty at the border; a few Adam
    steps towards a red target change every parameter group and lower the loss."""
    field = NeRFField(NeRFConfig(grid=SMALL, radius=1.0),
                      generator=torch.Generator().manual_seed(0))
    cams = camera_on_x(3.0, size=9)
    out = render(field, cams, n_samples=32)
    assert out.alpha[0, 4, 4, 0] > 0.9 and out.alpha[0, 0, 0, 0] < 0.05
    groups = field.param_groups()
    optimiser = torch.optim.Adam([{"params": p} for p in groups.values()], lr=1e-2)
    target = torch.tensor([1.0, 0.0, 0.0])
    losses = []
    for _ in range(10):
        rgb = render(field, cams, n_samples=32, background=0.0).rgb
        loss = ((rgb[0, 3:6, 3:6] - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        for name, params in groups.items():
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_field_holding_nan_is_refused_naming_the_parameter():
    field = NeRFField(NeRFConfig(grid=SMALL, radius=1.0),
                      generator=torch.Generator().manual_seed(0))
    names = [name for name, _ in field.named_parameters()]
    with torch.no_grad():
        dict(field.named_parameters())[names[-1]].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"NeRF parameter '{names[-1]}' contains NaN or Inf"):
        render(field, camera_on_x(3.0, size=5), n_samples=8)


def test_stratified_samples_are_seeded():
    field = NeRFField(NeRFConfig(grid=SMALL), generator=torch.Generator().manual_seed(0))
    cams = camera_on_x(3.0, size=7)
    first = render(field, cams, n_samples=16, generator=torch.Generator().manual_seed(5)).rgb
    again = render(field, cams, n_samples=16, generator=torch.Generator().manual_seed(5)).rgb
    other = render(field, cams, n_samples=16, generator=torch.Generator().manual_seed(6)).rgb
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.gpu
def test_tcnn_and_torch_hash_grids_agree():
    pytest.importorskip("tinycudann")
    cfg = HashGridConfig(n_levels=8, log2_hashmap_size=14, max_resolution=256, backend="tcnn")
    fused = hash_grid(cfg, "cuda")
    plain = HashGrid(cfg).cuda()
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints move across
    with torch.no_grad():  # tables far from tcnn's +-1e-4 start, so a wrong index shows
        fused.params.normal_()
    plain.load_state_dict({k: v.float() for k, v in fused.state_dict().items()})
    x = torch.rand(4096, 3, device="cuda")
    assert torch.allclose(fused(x), plain(x), atol=1e-4)


class Ball:
    """Density 20 inside a sphere of radius 0.6, colour from position."""

    cfg = NeRFConfig(radius=1.0)
    device = torch.device("cpu")

    def query(self, points):
        return torch.where(points.norm(dim=-1) < 0.6, 20.0, 0.0), (points + 1) / 2


def test_marching_cubes_of_a_sphere_is_closed_and_outward(tmp_path):
    """The automatic threshold puts the surface within one cell of the sphere; every edge has
    exactly two faces (watertight); the signed volume is positive (faces look outwards); the
    .obj and .glb files hold the same mesh."""
    from cfd.scene.mesh import extract_mesh, read_glb, write_glb, write_obj

    mesh = extract_mesh(Ball(), resolution=64)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    cell = 2.0 / 63
    assert np.all(np.abs(radii - 0.6) < cell)
    edges = np.sort(np.concatenate([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]],
                                    mesh.faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)
    v, f = mesh.vertices.astype(np.float64), mesh.faces
    volume = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert volume == pytest.approx(4 / 3 * math.pi * 0.6 ** 3, rel=0.15)
    assert np.allclose(mesh.colours, (mesh.vertices + 1) / 2, atol=1e-6)

    write_obj(mesh, tmp_path / "m.obj")
    lines = (tmp_path / "m.obj").read_text().splitlines()
    assert sum(l.startswith("v ") for l in lines) == len(mesh.vertices)
    assert sum(l.startswith("f ") for l in lines) == len(mesh.faces)
    write_glb(mesh, tmp_path / "m.glb")
    gltf, binary = read_glb(tmp_path / "m.glb")
    count = gltf["accessors"][0]["count"]
    positions = np.frombuffer(binary, "<f4", count * 3).reshape(-1, 3)
    assert np.allclose(positions[:, [0, 2]] * [1, -1], mesh.vertices[:, [0, 1]])
    assert gltf["accessors"][-1]["count"] == mesh.faces.size


def test_empty_field_is_a_clear_error():
    from cfd.scene.mesh import extract_mesh

    class Empty(Ball):
        def query(self, points):
            return torch.zeros(len(points)), torch.zeros(len(points), 3)

    with pytest.raises(ValueError, match="nothing to mesh"):
        extract_mesh(Empty(), resolution=16, threshold=1.0)


def blob_field(dtype=torch.float32):
    """A fresh field (the same every call): its density is the radial blob (the grid adds
    ~1e-4)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the MLPs' initialisation
        return NeRFField(NeRFConfig(grid=SMALL),
                         generator=torch.Generator().manual_seed(0)).to(dtype)


def test_normals_are_the_outward_density_gradient():
    """On the initial blob the normals point away from the centre; they match central finite
    differences of the density; ``query`` and ``query_with_normals`` agree on the rest."""
    field = blob_field()
    points = torch.nn.functional.normalize(
        torch.randn(200, 3, generator=torch.Generator().manual_seed(1)), dim=-1) * 0.3
    density, rgb, normal = field.query_with_normals(points)
    plain_density, plain_rgb = field.query(points)
    assert torch.equal(density, plain_density) and torch.equal(rgb, plain_rgb)
    assert torch.allclose(normal.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert ((normal * points).sum(-1) / points.norm(dim=-1)).min() > 0.99
    eps = 1e-3
    with torch.no_grad():
        fd = torch.stack([(field.query(points + eps * e)[0] - field.query(points - eps * e)[0])
                          / (2 * eps) for e in torch.eye(3)], -1)
    cos = (normal * -torch.nn.functional.normalize(fd, dim=-1)).sum(-1)
    assert cos.min() > 0.999
    with torch.no_grad():
        _, _, eval_normal = field.query_with_normals(points)
    assert not eval_normal.requires_grad and torch.allclose(eval_normal, normal.detach())


def test_normals_train_the_geometry_by_double_backward():
    """A loss on the normals reaches the density network; its gradient matches a central
    finite difference of that loss in one weight (float64)."""
    field = blob_field(torch.float64)
    points = torch.rand(64, 3, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64) * 0.8 - 0.4
    weight = field.density_net[0].weight

    def loss():
        return field.query_with_normals(points)[2][:, 0].sum()

    loss().backward()
    analytic = weight.grad[3, 5].item()
    assert field.encoding.params.grad.abs().sum() > 0
    eps = 1e-6
    with torch.no_grad():
        weight[3, 5] += eps
        up = loss().item()
        weight[3, 5] -= 2 * eps
        down = loss().item()
    assert analytic != 0 and analytic == pytest.approx((up - down) / (2 * eps), rel=1e-4)


def test_lambertian_shading_of_the_blob():
    """Camera and blob on the x axis: a light from the camera lights the centre pixel fully
    (ambient + diffuse), one from behind leaves the ambient only; a textured view scales
    the albedo by that factor, a textureless one shades white; the normal map points at the
    camera."""
    from cfd.renderers.shading import Lighting

    field, cams = blob_field(), camera_on_x(3.0, size=9)
    centre = (0, 4, 4)

    def lit(direction, textureless):
        light = Lighting(torch.tensor([direction]), torch.tensor([0.1]), torch.tensor([0.9]),
                         torch.tensor([textureless]))
        with torch.no_grad():
            return render(field, cams, n_samples=64, background=0.0, lighting=light)

    with torch.no_grad():
        albedo = render(field, cams, n_samples=64, background=0.0)
    alpha = albedo.alpha[centre]
    assert alpha > 0.99
    front, back = lit([1.0, 0.0, 0.0], True), lit([-1.0, 0.0, 0.0], True)
    assert torch.allclose(front.rgb[centre], alpha * 1.0, atol=0.02)
    assert torch.allclose(back.rgb[centre], alpha * 0.1, atol=0.02)
    textured = lit([1.0, 0.0, 0.0], False)
    assert torch.allclose(textured.rgb[centre], albedo.rgb[centre], atol=0.02)
    assert torch.allclose(lit([-1.0, 0.0, 0.0], False).rgb[centre], 0.1 * albedo.rgb[centre],
                          atol=0.01)
    assert torch.allclose(front.normal[centre], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert albedo.normal is None


class CountingField:
    """A field that counts the samples it is queried at with and without autograd."""

    def __init__(self, field):
        self.field, self.cfg = field, field.cfg
        self.with_grad = self.without_grad = 0

    def query(self, points):
        if torch.is_grad_enabled():
            self.with_grad += points.shape[0]
        else:
            self.without_grad += points.shape[0]
        return self.field.query(points)


@pytest.mark.parametrize("chunk_rays", [1024, 20])
def test_gradient_budget_keeps_the_forward_and_bounds_the_backward(chunk_rays):
    from cfd.renderers.volume import render_field

    cams = camera_on_x(3.0, size=9)
    full = CountingField(blob_field())
    want = render_field(full, cams, n_samples=16, chunk_rays=chunk_rays,
                        generator=torch.Generator().manual_seed(0))
    assert full.with_grad == 81 * 16 and full.without_grad == 0
    budget = CountingField(blob_field())
    got = render_field(budget, cams, n_samples=16, chunk_rays=chunk_rays, max_grad_samples=300,
                       generator=torch.Generator().manual_seed(0))
    assert budget.with_grad == 300 and budget.with_grad + budget.without_grad == 81 * 16
    if chunk_rays >= 81:  # one chunk: the budget's draw comes after the chunk's samples
        assert torch.allclose(got.rgb, want.rgb, atol=1e-6)
        assert torch.allclose(got.depth, want.depth, atol=1e-5)
    got.rgb.sum().backward()
    assert budget.field.encoding.params.grad.abs().sum() > 0


def test_normal_orbit_frames_show_the_normal_facing_the_camera():
    """The first frame of a normal orbit at elevation 0: the blob's centre pixel has the colour
    of the unit vector towards the camera, ``n / 2 + 1/2``."""
    from cfd.cameras import fixed_orbit_cameras
    from cfd.visualize import render_orbit

    field = blob_field()
    frames = render_orbit(field, n_frames=2, size=9, elevation=0.0, distance=3.0,
                          background=0.0, render_options={"n_samples": 64}, show="normal")
    camera = fixed_orbit_cameras(2, 9, 9, 0.0, 3.0, 40.0).centers[0]
    want = torch.nn.functional.normalize(camera, dim=0) / 2 + 0.5
    assert torch.allclose(frames[0, 4, 4], want, atol=0.03)
    with pytest.raises(ValueError, match="'rgb' or 'normal'"):
        render_orbit(field, n_frames=1, size=4, show="depth")


def test_gradient_budget_shares_alike_whatever_each_chunk_queries():
    """10 of 100 queried samples: each chunk gets a tenth of what it queries, rounding carried
    over, empty chunks nothing, and the render exactly its total; a budget above what the
    render queries grants every sample."""
    from cfd.renderers.volume import GradientBudget

    budget = GradientBudget(10, 100)
    assert [budget.take(n) for n in (50, 0, 25, 25)] == [5, 0, 2, 3]
    budget = GradientBudget(500, 100)
    assert [budget.take(n) for n in (60, 40)] == [60, 40]


def blob_occupancy(field, n_samples):
    """An occupancy grid of the blob after one update (about a tenth of the box occupied)."""
    from cfd.renderers.occupancy import OccupancyConfig, OccupancyGrid

    grid = OccupancyGrid(field.cfg.radius, OccupancyConfig(resolution=16))
    fraction = grid.update(lambda p: field.query(p)[0], 2 * field.cfg.radius / n_samples,
                           torch.Generator().manual_seed(1))
    assert 0.02 < fraction < 0.5
    return grid


@pytest.mark.parametrize("chunk_rays", [1024, 20])
def test_gradient_budget_counts_only_the_samples_the_occupancy_grid_lets_through(chunk_rays):
    """With empty space skipped, ``max_grad_samples`` samples carry gradients whenever the
    render queries that many, and every queried sample when it queries fewer: the budget is
    shared over the queried samples, not over all of the render's. The draws stay seeded."""
    from cfd.renderers.volume import render_field

    cams = camera_on_x(3.0, size=9)
    occupancy = blob_occupancy(blob_field(), 16)

    def counted(budget):
        field = CountingField(blob_field())
        out = render_field(field, cams, n_samples=16, chunk_rays=chunk_rays,
                           occupancy=occupancy, max_grad_samples=budget,
                           generator=torch.Generator().manual_seed(0))
        return field, out

    full, _ = counted(None)
    assert full.without_grad == 0 and full.with_grad < 81 * 16 // 2
    for budget in (full.with_grad // 2, full.with_grad + 100):
        field, out = counted(budget)
        # the budget's draws shift the later chunks' stratified positions, so a chunked
        # render queries a few samples more or fewer than the unbudgeted one
        queried = field.with_grad + field.without_grad
        assert abs(queried - full.with_grad) < 20
        assert field.with_grad == min(budget, queried)
        again, out_again = counted(budget)
        assert again.with_grad == field.with_grad and torch.equal(out.rgb, out_again.rgb)


@pytest.mark.parametrize("chunk_rays", [8192, 20])
def test_gradient_budget_above_the_queried_samples_gives_the_full_gradient(chunk_rays):
    """A budget between the queried and the total sample count: every queried sample carries
    gradients, so the render and the parameters' gradients are the full render's, over one
    chunk or several (the budget draws nothing from the generator then)."""
    from cfd.renderers.volume import render_field

    cams = camera_on_x(3.0, size=9)
    occupancy = blob_occupancy(blob_field(), 16)
    grads = []
    for budget in (None, 81 * 16 - 1):
        field = blob_field()
        out = render_field(field, cams, n_samples=16, occupancy=occupancy,
                           max_grad_samples=budget, generator=torch.Generator().manual_seed(0),
                           chunk_rays=chunk_rays)
        (out.rgb.square().sum() + out.depth.sum()).backward()
        grads.append([out.rgb] + [p.grad for p in field.parameters()])
    for full, budgeted in zip(*grads):
        assert torch.equal(full, budgeted)


def kept_for_backward(fn) -> int:
    """Bytes of the tensors autograd keeps saved for the backward of ``fn()``'s result, each
    storage once (not those of graphs already freed, as the normals' inner one without
    autograd). For measuring only: what it saves comes back detached."""
    import gc
    import weakref

    saved = []

    def pack(tensor):
        # a detached view: the tensor itself would tie a saved output to its own graph in a
        # cycle that keeps freed graphs alive
        view = tensor.detach()
        saved.append(weakref.ref(view))
        return view

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    gc.collect()
    storages = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    del result
    return sum(storages.values())


@pytest.mark.parametrize("lit", [False, True])
def test_gradient_budget_memory_does_not_grow_with_the_image(lit):
    """Under a fixed budget, four times the pixels keep about the same bytes for the backward:
    samples without gradients and rays without such samples keep nothing per sample."""
    from cfd.renderers.shading import Lighting
    from cfd.renderers.volume import render_field

    field = blob_field()
    lighting = (Lighting(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0.1]),
                         torch.tensor([0.9]), torch.tensor([False])) if lit else None)

    def kept(size):
        return kept_for_backward(lambda: render_field(
            field, camera_on_x(3.0, size=size), n_samples=16, max_grad_samples=200,
            lighting=lighting, generator=torch.Generator().manual_seed(0)))

    small, large = kept(24), kept(48)
    assert large < 1.2 * small


@pytest.mark.parametrize("options, match", [
    ({"n_samples": 0}, "n_samples .* at least 1"),
    ({"n_samples": -3}, "n_samples .* at least 1"),
    ({"chunk_rays": 0}, "chunk_rays .* at least 1"),
    ({"max_grad_samples": 0}, "max_grad_samples must be a positive"),
])
def test_render_field_refuses_bad_settings(options, match):
    from cfd.renderers.volume import render_field

    with pytest.raises(ValueError, match=match):
        render_field(Slab(1.0, 0.2, [1.0, 0.0, 0.0]), camera_on_x(), **options)


@pytest.mark.parametrize("options, match", [
    ({"radius": 0.0}, "nerf.radius .* must be positive"),
    ({"radius": -1.0}, "nerf.radius .* must be positive"),
    ({"blob_radius": 0.0}, "nerf.blob_radius must be positive.*nerf.blob_density=0"),
    ({"blob_radius": -0.5}, "nerf.blob_radius must be positive"),
])
def test_nerf_field_refuses_an_empty_box_or_blob(options, match):
    with pytest.raises(ValueError, match=match):
        NeRFField(NeRFConfig(grid=SMALL, **options))


def test_a_field_without_blob_is_blob_density_zero():
    """``blob_density = 0`` is the field with no starting blob: the density is the head's
    alone, finite everywhere."""
    field = NeRFField(NeRFConfig(grid=SMALL, blob_density=0.0),
                      generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [0.9, 0.9, 0.9]])
    with torch.no_grad():
        density, _ = field.query(points)
        head = field.density_net(field.encoding(field.contract(points)))[:, 0]
    assert torch.equal(density, torch.exp(head))


@pytest.mark.parametrize("options, match", [
    ({"resolution": 0}, "occupancy.resolution .* at least 1"),
    ({"update_every": 0}, "occupancy.update_every .* at least 1"),
])
def test_occupancy_grid_refuses_bad_settings(options, match):
    from cfd.renderers.occupancy import OccupancyConfig, OccupancyGrid

    with pytest.raises(ValueError, match=match):
        OccupancyGrid(1.0, OccupancyConfig(**options))


def test_occupancy_state_of_another_resolution_is_refused():
    """A checkpoint's 32^3 grid does not load into a 16^3 one (it would index the wrong cells);
    one of the same resolution round-trips."""
    from cfd.renderers.occupancy import OccupancyConfig, OccupancyGrid

    saved = OccupancyGrid(1.0, OccupancyConfig(resolution=32))
    saved.update(lambda p: (p.norm(dim=-1) < 0.5).float() * 100, 0.1)
    with pytest.raises(ValueError, match=r"\(32, 32, 32\).*occupancy.resolution=16"):
        OccupancyGrid(1.0, OccupancyConfig(resolution=16)).load_state_dict(saved.state_dict())
    same = OccupancyGrid(1.0, OccupancyConfig(resolution=32))
    same.load_state_dict(saved.state_dict())
    assert torch.equal(same.occupied, saved.occupied) and not same.occupied.all()


def test_density_grid_is_the_dense_grid_chunk_by_chunk():
    """Chunked from flat indices (a chunk that does not divide R^3), the grid is bitwise the
    one sampled at all of ``meshgrid``'s points at once, in the field's dtype."""
    from cfd.scene.mesh import density_grid

    field = blob_field()
    R = 9
    axis = torch.linspace(-1.0, 1.0, R)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        want = field.query(points)[0].reshape(R, R, R)
    got = density_grid(lambda p: field.query(p)[0], 1.0, R, chunk=100)
    assert torch.equal(got, want)
    double = density_grid(lambda p: p.double().norm(dim=-1), 1.0, R, chunk=100)
    assert double.dtype == torch.float64


def test_mesh_resolution_below_two_is_refused():
    from cfd.scene.mesh import extract_mesh

    with pytest.raises(ValueError, match="mesh_resolution .* at least 2"):
        extract_mesh(Ball(), resolution=1)


def test_nan_density_is_refused_and_infinite_density_meshes_finitely(tmp_path):
    """NaN density has no surface (a clear error, not NaN vertices); +inf is very dense: the
    mesh is finite, sits where the finite ball's does, and its .glb is valid JSON."""
    import json

    from cfd.scene.mesh import extract_mesh, read_glb, write_glb

    class NaNBall(Ball):
        def query(self, points):
            density, rgb = super().query(points)
            return torch.where(points[:, 0] > 0.5, torch.nan, density), rgb

    class InfBall(Ball):
        def query(self, points):
            density, rgb = super().query(points)
            return torch.where(density > 0, torch.inf, 0.0), rgb

    with pytest.raises(ValueError, match="density is NaN"):
        extract_mesh(NaNBall(), resolution=16)
    mesh = extract_mesh(InfBall(), resolution=32, threshold=10.0)
    assert np.isfinite(mesh.vertices).all()
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - 0.6).max() < 2 * 2.0 / 31
    write_glb(mesh, tmp_path / "inf.glb")

    def refuse(constant):
        raise ValueError(constant)

    gltf, _ = read_glb(tmp_path / "inf.glb")
    json.loads(json.dumps(gltf), parse_constant=refuse)
    assert np.isfinite(gltf["accessors"][0]["min"]).all()


def test_write_glb_refuses_non_finite_vertices(tmp_path):
    from cfd.scene.mesh import Mesh, write_glb

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]], np.float32)
    with pytest.raises(ValueError, match="vertices hold NaN or Inf"):
        write_glb(Mesh(vertices, np.array([[0, 1, 2]])), tmp_path / "bad.glb")
    assert not (tmp_path / "bad.glb").exists()


def test_glb_colours_are_linear_and_obj_colours_srgb(tmp_path):
    """glTF's COLOR_0 is linear: a rendered (sRGB) 0.5 is stored as 0.214, which a viewer
    shows as 0.5 again; 0 and 1 stay. The .obj keeps the rendered values."""
    from cfd.scene.mesh import Mesh, read_glb, write_glb, write_obj

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    colours = np.array([[0.5, 0.5, 0.5], [0.0, 1.0, 0.02], [0.2, 0.8, 1.0]], np.float32)
    mesh = Mesh(vertices, np.array([[0, 1, 2]]), colours)
    write_glb(mesh, tmp_path / "m.glb")
    gltf, binary = read_glb(tmp_path / "m.glb")
    view = gltf["bufferViews"][gltf["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"]]
    stored = np.frombuffer(binary, "<f4", 9, view["byteOffset"]).reshape(3, 3)
    assert stored[0] == pytest.approx([0.21404] * 3, abs=1e-5)
    assert stored[1] == pytest.approx([0.0, 1.0, 0.02 / 12.92], abs=1e-7)
    shown = np.where(stored <= 0.0031308, 12.92 * stored, 1.055 * stored ** (1 / 2.4) - 0.055)
    assert np.allclose(shown, colours, atol=1e-5)
    write_obj(mesh, tmp_path / "m.obj")
    first = (tmp_path / "m.obj").read_text().splitlines()[0]
    assert first.split()[4:] == ["0.5000", "0.5000", "0.5000"]


def test_no_surface_at_the_threshold_is_a_clear_error(tmp_path):
    """A threshold below the whole density range (the field and the empty box around it) has
    no surface: the error names the threshold, the range and ``mesh_threshold``; ``write_glb``
    refuses an empty mesh rather than failing in NumPy."""
    from cfd.scene.mesh import Mesh, extract_mesh, write_glb

    with pytest.raises(ValueError, match=r"threshold -1.*\[0, 20\].*mesh_threshold"):
        extract_mesh(Ball(), resolution=16, threshold=-1.0)
    empty = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="empty mesh"):
        write_glb(empty, tmp_path / "empty.glb")
