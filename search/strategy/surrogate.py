"""The evolution strategy's model of the objectives: one-hot slot features of a genome and a Bayesian linear model
(a linear-kernel Gaussian process) over them, from which each proposal draws one function (Thompson sampling)."""

from __future__ import annotations


import numpy as np

from space import SearchSpace

from .genome import Gene, Genome, encoded_choices, slot_modes, slot_names


class Features:
    """Features of a genome in four groups, each with its own prior scale in :class:`LinearGP`:

    * global (0): the number of layers (with the bias);
    * per slot (1): slot placed, slot×module;
    * fine (2): slot×mode, slot×module×mode, slot×module×value;
    * pairs (3): two slots placed together (interactions between layers).

    Every feature but the pairs belongs to one slot's layer, so a genome's linear score is a sum of per-slot gene
    scores plus terms of its placement alone; :meth:`best_genes` uses that to optimise a linear score exactly.
    (Features shared by a module across slots were tried: on the known-answer benchmark they made the latency
    model worse, as the marginal likelihood then put the per-slot scale to zero.)
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        names = list(slot_names(space))
        groups: dict[tuple, int] = {("layers",): 0}
        for name in names:
            groups[(name,)] = 1
            for module, hps in space.options[name].items():
                groups[(name, module)] = 1
                groups.update({(name, module, "mode", mode): 2 for mode in slot_modes(space, name)})
                for hp, values in hps.items():
                    groups.update({(name, module, hp, v): 2 for v in encoded_choices(values)})
            groups.update({(name, "mode", mode): 2 for mode in slot_modes(space, name)})
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                groups[(a, "&", b)] = 3
        self.index = {c: i for i, c in enumerate(groups)}
        self.groups = np.array(list(groups.values()))

    def __call__(self, genome: Genome) -> np.ndarray:
        x = np.zeros(len(self.index))
        x[self.index[("layers",)]] = len(genome)
        for name, gene in genome.items():
            for key in self._gene_keys(name, gene):
                x[self.index[key]] += 1.0
        for key in self._pair_keys(genome):
            x[self.index[key]] = 1.0
        return x

    def _gene_keys(self, name: str, gene: Gene) -> list[tuple]:
        keys = [(name,), (name, gene.module), (name, "mode", gene.mode), (name, gene.module, "mode", gene.mode)]
        return keys + [(name, gene.module, hp, v) for hp, v in gene.hparams]

    def _pair_keys(self, genome: Genome) -> list[tuple]:
        names = sorted(genome)
        return [(a, "&", b) if (a, "&", b) in self.index else (b, "&", a)
                for i, a in enumerate(names) for b in names[i + 1:]]

    def best_genes(self, coef: np.ndarray) -> dict[str, Gene]:
        """Per slot, the gene with the lowest ``coef`` · features (each value chosen on its own: the score is
        additive over a gene's features)."""
        best = {}
        for name in slot_names(self.space):
            found = None
            for module, hps in self.space.options[name].items():
                mode = min(slot_modes(self.space, name), key=lambda m: coef[self.index[(name, "mode", m)]]
                           + coef[self.index[(name, module, "mode", m)]])
                hparams = tuple((hp, min(encoded_choices(values), key=lambda v: coef[self.index[(name, module, hp, v)]]))
                                for hp, values in hps.items())
                gene = Gene(module, mode, hparams)
                score = sum(coef[self.index[k]] for k in self._gene_keys(name, gene))
                if found is None or score < found[0]:
                    found = (score, gene)
            best[name] = found[1]
        return best


class LinearGP:
    """A Gaussian process with a linear kernel over :class:`Features` (Bayesian linear regression): one prior
    scale per feature group and the noise scale, chosen by marginal likelihood (coordinate ascent on a grid).

    Hand-written (numpy) because Optuna's GP needs scipy, which is not a dependency, and its kernel treats
    categorical parameters of a conditional space as absent whenever they are."""

    PRIOR_VARS = ((0.1, 1.0), (0.03, 0.1, 0.3, 1.0, 3.0), (0.0, 0.03, 0.1, 0.3, 1.0), (0.0, 0.03, 0.1, 0.3))
    NOISE_VARS = (0.001, 0.01, 0.1, 0.3)

    def __init__(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        n_groups = len(self.PRIOR_VARS)
        self.groups = np.append(groups, 0)  # a bias column, shared: the prior mean of the standardised target
        self.x = np.hstack([x, np.ones((len(x), 1))])
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        z = (y - self.mean) / self.scale
        # Each group's prior is the variance its features add to a typical trial's standardised value, so the grid
        # means the same whatever the number of features in the group.
        grams = [self.x[:, self.groups == g] @ self.x[:, self.groups == g].T for g in range(n_groups)]
        typical = [float(np.mean(np.diag(k))) or 1.0 for k in grams]
        cache: dict[tuple, tuple] = {}

        def fit(choice: tuple[int, ...]) -> tuple:
            if choice not in cache:
                priors = [grid[i] for grid, i in zip(self.PRIOR_VARS, choice)]
                noise = self.NOISE_VARS[choice[-1]]
                gram = sum(p / t * k for p, t, k in zip(priors, typical, grams))
                chol = np.linalg.cholesky(gram + noise * np.eye(len(z)))
                alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
                cache[choice] = (-0.5 * z @ alpha - np.log(np.diag(chol)).sum(), priors, noise, chol, alpha)
            return cache[choice]

        # Coordinate ascent from the grid's middle: a full product of the grids costs ~10x as many factorisations
        # and chose the same scales on the benchmark's spaces.
        grids = [*self.PRIOR_VARS, self.NOISE_VARS]
        choice = tuple(len(g) // 2 for g in grids)
        for _ in range(3):
            before = choice
            for axis, grid in enumerate(grids):
                choice = max((choice[:axis] + (i,) + choice[axis + 1:] for i in range(len(grid))),
                             key=lambda c: fit(c)[0])
            if choice == before:
                break
        _, self.priors, self.noise, chol, self.alpha = fit(choice)
        self.z = z
        inverse_chol = np.linalg.solve(chol, np.eye(len(z)))
        self.k_inverse = inverse_chol.T @ inverse_chol
        # the prior variance of each feature's weight
        self.weights = np.array([self.priors[g] / typical[g] for g in self.groups])

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (of the latent function) at the rows of ``x``, in the target's units."""
        x = np.hstack([x, np.ones((len(x), 1))])
        cross = (x * self.weights) @ self.x.T
        mean = cross @ self.alpha
        var = np.maximum((x * x * self.weights).sum(1) - ((cross @ self.k_inverse) * cross).sum(1), 1e-12)
        return mean * self.scale + self.mean, np.sqrt(var) * self.scale

    def mean_weights(self) -> tuple[np.ndarray, float]:
        """The posterior mean of the weights, as :meth:`sample` returns a draw."""
        w = self.weights * (self.x.T @ self.alpha)
        return w[:-1] * self.scale, float(w[-1] * self.scale + self.mean)

    def sample(self, rng: np.random.Generator, spread: float | np.ndarray = 1.0) -> tuple[np.ndarray, float]:
        """One draw of the weights from the posterior (Matheron's rule: a prior draw corrected by the data), as
        (per-feature weights, offset) in the target's units: the drawn function is ``x @ weights + offset``.
        ``spread`` < 1 draws closer to the posterior mean (its deviation scaled); one value, or one per feature."""
        prior = rng.normal(size=len(self.weights)) * np.sqrt(self.weights)
        noise = rng.normal(size=len(self.z)) * np.sqrt(self.noise)
        w = prior + self.weights * (self.x.T @ (self.k_inverse @ (self.z - self.x @ prior - noise)))
        w = spread * w + (1.0 - spread) * self.weights * (self.x.T @ self.alpha)
        return w[:-1] * self.scale, float(w[-1] * self.scale + self.mean)


