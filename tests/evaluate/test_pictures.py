import numpy as np
import torch

from ulm_dist.config import load_config
from ulm_dist.evaluate.pictures import draw_points, landmark_colours, pair_sheet, regression_sheet
from ulm_dist.models import CycleConsistencyModel


def test_colours_are_distinct():
    colours = landmark_colours(30)
    assert len(set(colours)) == 30


def test_points_are_drawn_where_they_are_in_their_colour():
    image = np.zeros((16, 16, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0)]
    drawn = np.asarray(draw_points(image, np.array([[4.0, 4.0], [12.0, 8.0]]), colours, scale=2))
    assert drawn.shape == (32, 32, 3)
    assert tuple(drawn[8, 8]) == (255, 0, 0)  # (4, 4) at scale 2
    assert tuple(drawn[16, 24]) == (0, 255, 0)  # (12, 8) at scale 2: row 16, column 24
    assert drawn[0, 0].sum() == 0


def test_sheets_have_one_row_per_image_and_a_column_per_picture():
    torch.manual_seed(0)
    model = CycleConsistencyModel(load_config().model)
    images = torch.rand(3, 3, 32, 32)
    name, sheet = pair_sheet(model, images, images.flip(0), scale=2)
    assert name == "cycle_sheet"  # what the cycle model says it draws
    assert sheet.size == (6 * 64, 14 + 3 * 64)
    points = torch.rand(3, 5, 2) * 32
    sheet = regression_sheet(images, points, points, points, scale=2)
    assert sheet.size == (2 * 64, 14 + 3 * 64)
