package lease

// SetAdvisoryHash replaces a's advisory key function, so that a test can make
// two keys collide.
func SetAdvisoryHash(a *Advisory, f func(Key) int64) { a.hash = f }

// AdvisoryBackends returns the backend pids of a's pinned connections.
func AdvisoryBackends(a *Advisory) []int32 {
	a.pins.mu.Lock()
	defer a.pins.mu.Unlock()
	pids := make([]int32, 0, len(a.pins.conns))
	for _, s := range a.pins.conns {
		pids = append(pids, s.pid)
	}
	return pids
}

// AdvisoryBackend returns the backend pid of an advisory lock's connection.
func AdvisoryBackend(l *Lock) int32 { return l.mode.(*advisoryLock).s.pid }
