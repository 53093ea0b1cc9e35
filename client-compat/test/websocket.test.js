'use strict';
// The contract suite with the unmodified v4 client, WebSocket only.
require('./contract').defineContractSuite('websocket');
