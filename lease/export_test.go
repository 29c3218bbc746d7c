package lease

import "time"

// Attempts returns how many acquire statements c has sent. Each is counted
// when its reply arrives, so a test that reads N knows the Nth was answered.
func Attempts(c *Client) int64 { return c.attempts.Load() }

// Cleanups returns how many orphan clean-up statements c has finished.
func Cleanups(c *Client) int64 { return c.cleanups.Load() }

// QueueLen returns how many of c's acquirers of key are queued (the head
// included).
func QueueLen(c *Client, key Key) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ks := c.keys[key.mapKey()]; ks != nil {
		return len(ks.queue)
	}
	return 0
}

// KeyStates returns how many keys c keeps local state for.
func KeyStates(c *Client) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.keys)
}

// Subscriptions returns how many keys have waiters subscribed to c's
// dispatcher.
func Subscriptions(c *Client) int { return c.disp.Subscriptions() }

// Listening reports whether c's LISTEN connection is up (and its reconnect
// wake-up delivered).
func Listening(c *Client) bool { return c.disp.Listening() }

// ListenerConnections returns how many times c's LISTEN connection was made.
func ListenerConnections(c *Client) int { return c.disp.Connections() }

// ListenerPID returns the backend pid of c's LISTEN connection, 0 if none.
func ListenerPID(c *Client) uint32 { return c.disp.BackendPID() }

// KeepListening makes c's dispatcher keep its LISTEN connection for an hour
// after the last waiter, instead of its linger of a few seconds.
func KeepListening(c *Client) { c.disp.SetLinger(time.Hour) }

// PauseListener keeps c's dispatcher from (re)connecting until resume is called.
func PauseListener(c *Client) (resume func()) { return c.disp.PauseConnecting() }
