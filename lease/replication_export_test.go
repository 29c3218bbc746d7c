package lease

import "time"

// NoteServerReading feeds c a reading of a server's clock, as if measured on
// server with the given offset and uncertainty, for the test of what the
// client logs when primaries' clocks differ (one machine has one clock).
func NoteServerReading(c *Client, server string, offset, uncertainty time.Duration) {
	c.noteServer(serverView{identity: server, offset: offset, uncertainty: uncertainty})
}
