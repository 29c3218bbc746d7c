package lease

import "context"

// Clean-ups: rows of this client's holder that it does not hold (orphans)
// and releases that failed. Each runs in the background, bounded by
// ReleaseTimeout, and is tried again after each renewal until it succeeds or
// the holder is gone: a row of a live holder does not expire by itself.

// cleanupOrphan deletes the rows of key that h may have but the client does
// not hold: a grant left by an acquire whose reply was lost, or whose
// statement went on after its ctx ended, or brought back by a crash that
// undid a release; and h's waiter row of the key, left by acquirers that gave
// up. It queues as a waiter on the key, so that no acquirer of this client
// runs meanwhile, and keeps every grant the client then holds on the key. If
// the delete fails, it is tried again after each renewal until it succeeds or
// the holder is lost; one that commits before a late insert is caught by the
// heartbeat's count (see verify).
//
// At most one clean-up of a holder's rows of a key waits for its turn: one
// that has not started reads what to keep when it does, so it deletes
// whatever a second one would. And a clean-up that failed is retried only
// once it is over: its statement may wait (for ReleaseTimeout) behind a
// transaction that holds the key's queue lock, such as the very acquire it
// cleans up after, whose statement goes on in the server; a retry at every
// renewal meanwhile would pile up clean-ups, each holding a goroutine and,
// in turn, a connection.
func (c *Client) cleanupOrphan(key Key, h *holder) {
	mk := key.mapKey()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return // Close deletes every row of the holder
	}
	if ks := c.keys[mk]; ks != nil && ks.cleanupPendingLocked(h) {
		c.mu.Unlock()
		return
	}
	ks, w, _ := c.enqueueLocked(key, mk, Exclusive, true, true) // never refuses a clean-up
	w.h = h
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		defer c.leave(key, ks, w)
		select {
		case <-w.turn:
		case <-c.closing:
			return
		}
		c.mu.Lock()
		w.started = true
		// Not retried while this one runs; put back if it fails.
		delete(h.orphans, mk)
		skip := h.lost // its rows go with the holder
		keep := ks.tableTokensLocked(h, key)
		c.mu.Unlock()
		if skip {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		_, err := c.pool.Exec(ctx, c.q.leave, key.Name, key.ID, h.id, h.secret, keep)
		c.mu.Lock()
		c.cleanups.Add(1) // with c.mu: a test that sees the count sees the orphan recorded
		if err != nil && !h.lost {
			// The holder lives on, and so would the orphan: nobody else
			// could take the key while this client never asks for it again.
			h.orphans[mk] = key
		} else {
			delete(h.orphans, mk)
		}
		c.mu.Unlock()
		if err != nil {
			c.log.Debug("pglease: orphan clean-up failed; retried after the next renewal", "name", key.Name, "id", key.ID, "error", err)
		}
	}()
}

// retryRelease deletes again the row of a release that failed.
func (c *Client) retryRelease(h *holder, k Key, token int64) {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
	defer cancel()
	if _, err := c.pool.Exec(ctx, c.q.release, k.Name, k.ID, token, h.id, h.secret); err != nil {
		return
	}
	c.mu.Lock()
	delete(h.pending, token)
	c.mu.Unlock()
}

// releaseInBackground deletes the row of key with token, best effort.
func (c *Client) releaseInBackground(h *holder, key Key, token int64) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		_, _ = c.pool.Exec(ctx, c.q.release, key.Name, key.ID, token, h.id, h.secret)
	}()
}
