"""What the pipeline summary says about a model: its own held-out numbers beside their floors and ceilings."""

from motus.pipeline.report import evaluation_line, held_out_line, model_numbers


def test_a_training_step_shows_its_drop_and_its_action_error_against_the_floor():
    line = held_out_line({"val/video_loss": [1.42, 0.53], "val/vla_action_mse": [1.96, 0.24],
                          "val/floor_zero_action_mse": [0.96, 0.96]})
    assert line == "; video_loss 1.42 -> 0.53 (-63%); vla_action_mse 1.96 -> 0.24 (-88%, 0.25x floor)"
    assert held_out_line({"val/video_loss": [0.0, 0.5]}) == ""  # no relative change from zero
    # the latent-action VAE against its untrained self (an R^2 may start below zero: no percentage)
    assert held_out_line({"lam/probe_r2": [-0.02, 0.17], "lam/recon_psnr": [7.1, 25.6]}) == \
        "; probe_r2 -0.02 (untrained) -> 0.17; recon_psnr 7.1 (untrained) -> 25.6"


def test_an_evaluation_shows_action_error_as_a_multiple_of_the_floor_and_successes_of_the_ceiling():
    line = evaluation_line({"eval/vla_action_mse": 0.222, "eval/idm_action_mse": 0.2,
                            "eval/floor_zero_action_mse": 0.962, "eval/success_rate": 0.0, "eval/success_rate_n": 8,
                            "eval/ceiling_success_rate": 1.0, "eval/ceiling_success_rate_n": 8})
    assert line == ("vla mse 0.222 = 0.23x floor, idm mse 0.2 = 0.21x floor, floor 0.962, success 0/8, "
                    "ceiling 8/8")


def test_a_registry_row_shows_the_evaluation_when_there_is_one_else_the_last_validation():
    evaluated = {"eval/vla_action_mse": 0.5, "eval/floor_zero_action_mse": 1.0, "val/vla_action_mse": 0.1}
    assert model_numbers(evaluated) == "vla mse 0.5 = 0.50x floor, floor 1"
    validated = {"val/video_loss": 0.53, "val/vla_action_mse": 0.24, "val/floor_zero_action_mse": 0.96}
    assert model_numbers(validated) == "video_loss 0.53, vla mse 0.24 = 0.25x floor 0.96"
    assert model_numbers({"lam/probe_r2": 0.41}) == "probe R2 0.41"
    closed_loop_only = {"eval/success_rate": 0.5, "eval/success_rate_n": 4, **validated}
    assert model_numbers(closed_loop_only) == "success 2/4, video_loss 0.53, vla mse 0.24 = 0.25x floor 0.96"
    assert model_numbers({}) == ""
