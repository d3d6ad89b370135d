"""Tests of leanfit.noisefit."""
