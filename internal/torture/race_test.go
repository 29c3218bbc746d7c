//go:build race

package torture

// raceEnabled: the helper binary is built with the race detector too.
const raceEnabled = true
