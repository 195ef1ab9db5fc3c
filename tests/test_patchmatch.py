"""PatchMatch, patch distances and voting against brute-force references (harmonize_core/postprocess/patchmatch.py)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import nearest_patches_bruteforce

from harmonize_core.images import decode_image, decode_mask, read_bytes
from harmonize_core.postprocess.patchmatch import patch_distance, patchmatch, vote

CASES = Path(__file__).resolve().parents[2] / "shared" / "dph-cases"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _texture(height: int, width: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """A smooth random RGB texture in [0, 1] (every 5x5 patch distinct, unlike a flat image)."""
    noise = torch.rand(1, 3, height // 2 + 2, width // 2 + 2, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    return (0.7 * smooth + 0.3 * torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed + 1))
            ).to(device)


def _explicit_distance(query, source, y, x, sy, sx, patch_size) -> float:
    """Squared L2 between the replicate-padded query patch at (y, x) and the source patch at (sy, sx), by loops."""
    radius, (height, width) = patch_size // 2, query.shape[-2:]
    total = 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            qy, qx = min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)
            total += float((query[0, :, qy, qx] - source[0, :, sy + dy, sx + dx]).square().sum())
    return total


@pytest.mark.parametrize("device", DEVICES)
def test_shifted_copy_gives_the_exact_shift(device):
    source = _texture(40, 44, seed=1, device=device)
    shift_y, shift_x = 4, 6
    query = torch.zeros(1, 3, 36, 38, device=device)
    query[...] = source[..., shift_y:shift_y + 36, shift_x:shift_x + 38]  # query[p] = source[p + shift]
    mask = torch.ones(36, 38, dtype=torch.bool, device=device)
    nnf = patchmatch(query, source, mask, patch_size=5, iterations=5, generator=_generator(device))
    rows, cols = torch.meshgrid(torch.arange(36, device=device), torch.arange(38, device=device), indexing="ij")
    # away from the query border (replicate padding there) the true match is the source patch at p + shift
    interior = (rows >= 2) & (rows < 34) & (cols >= 2) & (cols < 36)
    assert torch.equal(nnf[..., 0][interior], (rows + shift_y)[interior])
    assert torch.equal(nnf[..., 1][interior], (cols + shift_x)[interior])
    assert float(patch_distance(query, source, nnf, 5)[interior].max()) == 0.0


def test_bruteforce_is_exact_on_a_tiny_case():
    query, source = _texture(9, 8, seed=3), _texture(10, 11, seed=4)
    mask = torch.zeros(9, 8, dtype=torch.bool)
    mask[2:7, 1:6] = True
    nnf, distance = nearest_patches_bruteforce(query, source, mask, 3)
    for y, x in mask.nonzero().tolist():
        costs = {(sy, sx): _explicit_distance(query, source, y, x, sy, sx, 3)
                 for sy in range(1, 9) for sx in range(1, 10)}
        best = min(costs, key=costs.get)  # first minimum in raster order
        assert tuple(nnf[y, x].tolist()) == best
        assert distance[y, x].item() == pytest.approx(costs[best], rel=1e-5, abs=1e-6)
    assert (nnf[~mask] == -1).all() and torch.isinf(distance[~mask]).all()


def test_patch_distance_matches_explicit_loops():
    query, source = _texture(12, 12, seed=5), _texture(14, 13, seed=6)
    mask = torch.ones(12, 12, dtype=torch.bool)
    nnf = patchmatch(query, source, mask, patch_size=5, iterations=1, generator=_generator("cpu"))
    distance = patch_distance(query, source, nnf, 5)
    for y, x in [(0, 0), (0, 11), (5, 6), (11, 3), (11, 11)]:
        sy, sx = nnf[y, x].tolist()
        assert 2 <= sy <= 11 and 2 <= sx <= 10  # matched patches lie inside the source
        assert distance[y, x].item() == pytest.approx(_explicit_distance(query, source, y, x, sy, sx, 5), rel=1e-5)


def test_matches_brute_force_within_10_percent_on_perturbed_painting_texture():
    source = _texture(64, 64, seed=7)
    query = (source.flip(-1) + 0.05 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)))
    mask = torch.ones(64, 64, dtype=torch.bool)
    nnf = patchmatch(query.clamp(0, 1), source, mask, patch_size=7, iterations=5, generator=_generator("cpu"))
    _, exact = nearest_patches_bruteforce(query.clamp(0, 1), source, mask, 7)
    ratio = patch_distance(query.clamp(0, 1), source, nnf, 7).mean() / exact.mean()
    assert 1.0 - 1e-6 <= float(ratio) <= 1.10


@pytest.mark.skipif(not CASES.is_dir(), reason="reference cases not present")
def test_matches_brute_force_within_10_percent_on_a_real_crop(case=9):
    painting = decode_image(read_bytes(CASES / f"{case}_target.jpg"), "painting")
    composite = decode_image(read_bytes(CASES / f"{case}_naive.jpg"), "composite")
    mask = decode_mask(read_bytes(CASES / f"{case}_c_mask.jpg"), "mask")[0, 0]
    rows, cols = mask.nonzero(as_tuple=True)
    top = int(rows.float().mean()) - 32
    left = int(cols.float().mean()) - 32
    query = composite[..., top:top + 64, left:left + 64]  # the pasted object and its surroundings
    source = painting[..., top - 8:top + 72, left - 8:left + 72]  # the painting around it
    wanted = torch.ones(64, 64, dtype=torch.bool)
    nnf = patchmatch(query, source, wanted, patch_size=7, iterations=5, generator=_generator("cpu", 316))
    _, exact = nearest_patches_bruteforce(query, source, wanted, 7)
    ratio = patch_distance(query, source, nnf, 7).mean() / exact.mean()
    assert 1.0 - 1e-6 <= float(ratio) <= 1.10


def test_only_the_query_mask_is_matched_and_the_seed_decides():
    query, source = _texture(20, 20, seed=9), _texture(24, 24, seed=10)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:15, 3:12] = True
    first = patchmatch(query, source, mask, patch_size=3, iterations=2, generator=_generator("cpu", 1))
    again = patchmatch(query, source, mask, patch_size=3, iterations=2, generator=_generator("cpu", 1))
    other = patchmatch(query, source, mask, patch_size=3, iterations=0, generator=_generator("cpu", 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first[~mask] == -1).all() and (first[mask] >= 1).all()


def test_vote_is_the_mean_of_the_source_pixels_the_patches_place():
    height, width, patch = 10, 11, 3
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(13.0), indexing="ij")
    # each source pixel is identified by its value: channel 0 = row, channel 1 = column, channel 2 = random
    source = torch.stack([rows, cols, torch.rand(12, 13, generator=torch.Generator().manual_seed(0))])[None]
    generator = torch.Generator().manual_seed(3)
    nnf = torch.stack([torch.randint(1, 11, (height, width), generator=generator),
                       torch.randint(1, 12, (height, width), generator=generator)], dim=-1)
    nnf[0, :] = -1  # unmatched pixels contribute nothing
    region = torch.zeros(height, width, dtype=torch.bool)
    region[1:9, 2:10] = True
    region[9, 0] = True  # a border pixel
    voted = vote(source, nnf, region, patch)
    for y in range(height):
        for x in range(width):
            placed = []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    cy, cx = y - dy, x - dx  # the patch centred at c places source[nnf[c] + o] on c + o
                    if 0 <= cy < height and 0 <= cx < width and nnf[cy, cx, 0] >= 0:
                        sy, sx = nnf[cy, cx].tolist()
                        placed.append(source[0, :, sy + dy, sx + dx])
            expected = torch.stack(placed).mean(0) if region[y, x] and placed else torch.zeros(3)
            torch.testing.assert_close(voted[0, :, y, x], expected, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_with_the_expected_shape():
    query, source = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="query_mask must be a bool"):
        patchmatch(query, source, torch.ones(8, 8), patch_size=3, iterations=1, generator=_generator("cpu"))
    with pytest.raises(ValueError, match="patch_size must be odd"):
        patchmatch(query, source, torch.ones(8, 8, dtype=torch.bool), patch_size=4, iterations=1,
                   generator=_generator("cpu"))
