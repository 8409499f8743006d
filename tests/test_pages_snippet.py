"""The run page's plain-timm snippet (app/static/snippet.js) for a dataset with images of more
than 8 bits: read as it says, an image gives the pixels the run trained on."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.browser import open_browser
from worker.selftuning.pixels import to_rgb


def test_the_snippet_reads_images_of_more_than_8_bits_as_the_run_trained_on_them(
    live_server, request, tmp_path
):
    """Plain timm's `Image.open(p).convert("RGB")` clipped a 12-bit camera's image nearly all
    white, and the model loaded as the snippet says answered otherwise than its run page's
    Try the model and the command line's predict, with no word of input_white_level."""
    with open_browser(request.node.name) as browser:
        page = browser.page
        page.goto(f"{live_server.url}/")
        eight_bit, twelve_bit = page.evaluate("""async () => {
            const { timmSnippet } = await import('/static/snippet.js');
            return [timmSnippet({ architecture: 'resnet18', numClasses: 3 }),
                    timmSnippet({ architecture: 'resnet18', numClasses: 3, whiteLevel: 4095 })];
        }""")
        browser.assert_no_errors()
    assert "open_image" not in eight_bit and "resnet18, 3 classes" in eight_bit
    assert twelve_bit.startswith(eight_bit + "\n")

    values = np.random.default_rng(5).integers(0, 4096, size=(24, 32), dtype=np.uint16)
    values[0, 0] = 4095  # the dataset's brightest value: a 12-bit white level
    path = tmp_path / "12-bit.png"
    Image.fromarray(values).save(path)
    # The snippet's lines after the model's, run as written with the run's config.json.
    namespace = {"config": {"input_white_level": 4095}}
    exec(twelve_bit[len(eight_bit):], namespace)  # noqa: S102 - the page's own code
    shown = np.asarray(namespace["open_image"](path))
    with Image.open(path) as image:
        trained = np.asarray(to_rgb(image, 4095))
    assert shown.shape == (24, 32, 3) and np.array_equal(shown, trained)
    with Image.open(path) as image:
        clipped = np.asarray(image.convert("RGB"))
    assert (clipped == 255).mean() > 0.9 and (trained == 255).mean() < 0.01
