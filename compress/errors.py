"""One error hierarchy, so callers catch `CompressError` and the CLI maps kinds to exit codes."""


class CompressError(Exception):
    """Base of every error raised on purpose by compress."""

    exit_code = 1


class RecipeError(CompressError):
    """The recipe is invalid. `problems` holds one line per mistake, each starting with its path."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            msg = head + self.problems[0]
        else:
            msg = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(CompressError):
    """The data named by the recipe cannot be used (missing column, empty split, bad encoding)."""

    exit_code = 2


class ModelError(CompressError):
    """The model named by the recipe cannot be loaded."""

    exit_code = 2


class StageError(CompressError):
    """A stage failed while running."""

    exit_code = 1


class RunFolderError(CompressError):
    """The output folder belongs to another run, or resuming is not possible."""

    exit_code = 2


class Interrupted(CompressError):
    """The run was asked to stop (Ctrl-C); work up to the last step boundary is saved."""

    exit_code = 130
